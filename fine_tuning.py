"""
Supervised fine-tuning: full weights or LoRA (through peft), on the SFT token files of dataset_sft.py,
starting from any checkpoint folder (ours, or a Hugging Face Llama / GPT-NeoX folder).

    python fine_tuning.py --init_from out/pretrain --train_data data/sft_train --val_data data/sft_val \
        --out_dir out/sft --lora True --merge True
    torchrun --nproc_per_node 8 fine_tuning.py ...            # DDP
    deepspeed fine_tuning.py --use_deepspeed True ...          # DeepSpeed ZeRO (configs/ds_zero*.json)

Launchers, precision, the loop, checkpoints / resume, logging and SIGTERM handling are trainer.py's,
shared with pretrain.py. What is fine-tuning's own:
- the loss counts assistant tokens only (targets -100 elsewhere, see dataset_sft.render_chat) and is the
  mean over every trained token of the global batch: trainer.py sums token losses over micro-batches and
  ranks and divides by the all-reduced token count, so a short reply weighs what each of its tokens weighs;
- LoRA: W x + (alpha / r) * B A x with A (r x in), B (out x r), B = 0 at the start, only A and B train.
  Checkpoints hold the adapter only, in peft's format (adapter_config.json + adapter_model.safetensors)
  with base_model_name_or_path = the base folder, so any peft user loads it with
  PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter); --merge also writes
  W + (alpha / r) B A as a plain checkpoint folder (out_dir/merged);
- long context: --rope_scaling (linear / dynamic / yarn) with a longer --max_seq_len, and LongLoRA's
  shifted sparse attention (--s2_attn) while training.
"""
import argparse
import json
import os
import shutil

import torch

from model import ATTN_IMPLS, Transformer, args_from_config
from trainer import add_train_args, print0, resolve_dtype, seed_everything, setup_distributed, str2bool, train

# peft target module names (the last part of a module's name) per architecture: attention and MLP
# projections; GQA's narrower k/v projections included
DEFAULT_TARGETS = {"llama": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                   "neox": "query_key_value,dense,dense_h_to_4h,dense_4h_to_h"}
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


# ----------------------------------------------------------------------------- data

class SFTBatches:
    """trainer.py's data contract (get_batch(step, rows), a function of (step, rows) only) on top of
    dataset_sft.SFTDataset: the rows of epochs 0, 1, 2, ... (each a fresh seeded shuffle) form one
    endless sequence, and global row r of step s is its row s * rows_per_step + r."""

    def __init__(self, path, max_seq_len, mode, rows_per_step, seed, vocab_size, tokenizer_hash, shuffle=True):
        from dataset_sft import SFTDataset
        # world_size 1: every rank sees all rows; the trainer picks this rank's rows of the global batch
        self.ds = SFTDataset(path, max_seq_len, mode=mode, shuffle=shuffle, seed=seed,
                             vocab_size=vocab_size, tokenizer_hash=tokenizer_hash)
        if len(self.ds) == 0:
            raise SystemExit(f"{path}: no sample fits in --max_seq_len {max_seq_len} (stats {self.ds.stats})")
        self.rows_per_step = rows_per_step
        self.rows_per_epoch = []  # rows per epoch (packing makes it vary a little with the shuffle)

    def locate(self, i):
        """(epoch, row within the epoch) of the i-th row of the endless sequence."""
        epoch = 0
        while True:
            if epoch == len(self.rows_per_epoch):
                self.rows_per_epoch.append(len(self.ds.epoch_rows(epoch)))
            if i < self.rows_per_epoch[epoch]:
                return epoch, i
            i -= self.rows_per_epoch[epoch]
            epoch += 1

    def get_batch(self, step, rows):
        out = []
        for r in rows:
            epoch, k = self.locate(step * self.rows_per_step + r)
            out.append(self.ds.make_row(self.ds.epoch_rows(epoch)[k]))
        return {key: torch.stack([row[key] for row in out]) for key in out[0]}


# ----------------------------------------------------------------------------- model

def load_base(folder, max_seq_len=None, rope_scaling=None, attn_impl="auto", dtype=torch.float32):
    """The base model, optionally with a longer context. A longer --max_seq_len with YaRN keeps the base's
    trained length as original_max_position_embeddings (YaRN's L0), else YaRN would take the new length."""
    config_path = os.path.join(folder, "config.json")
    if not os.path.exists(config_path):
        raise SystemExit(f"--init_from {folder}: no config.json (not a checkpoint folder)")
    with open(config_path) as f:
        base_args = args_from_config(json.load(f))
    overrides = {"attn_impl": attn_impl}
    if max_seq_len:
        overrides["max_seq_len"] = max_seq_len
    if rope_scaling:
        rope_scaling = dict(rope_scaling)
        if rope_scaling.get("rope_type", rope_scaling.get("type")) == "yarn":
            rope_scaling.setdefault("original_max_position_embeddings", base_args.max_seq_len)
        overrides["rope_scaling"] = rope_scaling
    return Transformer.from_pretrained(folder, dtype=dtype, **overrides)


def add_lora(model, base_folder, r=8, alpha=16, dropout=0.05, targets=None):
    """Inject LoRA layers into `model` in place (peft) and return the PeftModel that wraps it. Only the
    adapter weights require grad afterwards. Our module tree is transformers' (model.layers.N.self_attn.
    q_proj ...), so peft names the adapter tensors as it does for a LlamaForCausalLM:
    base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight."""
    from peft import LoraConfig, PeftModel
    targets = targets.split(",") if isinstance(targets, str) else (targets or DEFAULT_TARGETS[model.args.arch].split(","))
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    head = "lm_head" if model.args.arch == "llama" else "embed_out"
    for t in targets:
        if t == head:  # the loss multiplies by output.weight directly (chunked), bypassing a LoRA head
            raise SystemExit(f"--lora_targets: {t} cannot be adapted (the loss uses its weight directly)")
        if t not in names:
            raise SystemExit(f"--lora_targets: no Linear layer named {t!r} in this {model.args.arch} model "
                             f"(has {', '.join(sorted(names - {head}))})")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none",
                        task_type="CAUSAL_LM", base_model_name_or_path=os.path.abspath(base_folder))
    # PeftModel itself (not get_peft_model): the CAUSAL_LM wrapper wants HF's generation API, which our
    # model does not have; the saved adapter_config still says CAUSAL_LM, so peft users get the
    # PeftModelForCausalLM when they load it onto a transformers model
    return PeftModel(model, config)


def save_adapter(peft_model, folder):
    """adapter_config.json + adapter_model.safetensors, written to folder.tmp then moved in."""
    tmp = folder.rstrip("/") + ".adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(tmp)
    os.makedirs(folder, exist_ok=True)
    for name in ADAPTER_FILES:
        os.replace(os.path.join(tmp, name), os.path.join(folder, name))
    shutil.rmtree(tmp)


def load_adapter(peft_model, folder):
    """Adapter weights of `folder` into the injected LoRA layers (resume)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    path = os.path.join(folder, "adapter_model.safetensors")
    if not os.path.exists(path):
        raise SystemExit(f"--resume: {path} missing (was this run started without --lora?)")
    result = set_peft_model_state_dict(peft_model, load_file(path))
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise SystemExit(f"--resume: {path} does not match --lora_r/--lora_targets "
                         f"(unexpected {result.unexpected_keys[:3]}, missing {missing[:3]})")


def merge_adapter(base_folder, adapter_dir, out, tokenizer_path, **base_kwargs):
    """W <- W + (alpha / r) B A in fp32 on a fresh copy of the base, written as a plain checkpoint folder."""
    from peft import LoraConfig, PeftModel
    model = load_base(base_folder, **base_kwargs)
    peft_model = PeftModel(model, LoraConfig.from_pretrained(adapter_dir))
    load_adapter(peft_model, adapter_dir)
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(out, tokenizer_path=tokenizer_path)
    return merged


def s2_attention(q, k, v, impl, mask=None, dropout_p=0.0, group_size=None):
    """LongLoRA's shifted sparse attention (S2-Attn), for training only. q: (B, H, T, D); k, v: (B, Hkv, T, D).

    Tokens are cut into groups of G and attention is causal within a group: cost T*G instead of T^2/2.
    The second half of the heads uses groups shifted by G/2 (a half group at each end), so each of its
    groups straddles two plain groups and information crosses group borders from layer to layer:
        plain heads:   group(p) = p // G          shifted heads: group(p) = (p + G/2) // G
    No mask anywhere: every group is a plain causal sequence of its own, folded into the batch dimension,
    so one causal call per group length runs on the flash / cuDNN kernels (memory linear in T).
    """
    if mask is not None:
        raise ValueError("S2-Attn: rows must be plain causal sequences (--sft_mode padding)")
    from model import attention, repeat_kv
    H, T = q.shape[1], q.shape[2]
    G, s = group_size, group_size // 2
    if T % G or G % 2:
        raise ValueError(f"S2-Attn: sequence length {T} must be a multiple of the (even) group size {G}")
    if k.shape[1] % 2:  # an odd number of kv heads cannot be split in halves with the query heads: expand
        k, v = repeat_kv(k, H // k.shape[1]), repeat_kv(v, H // k.shape[1])
    h, hk = H // 2, k.shape[1] // 2  # query heads [0, h) use kv heads [0, hk): GQA's pairing is kept
    if impl == "flex":  # flex's mask=None means no mask at all, sdpa's means causal
        impl = "sdpa"

    def grouped(q, k, v, g):
        """Causal attention within consecutive groups of g tokens of (b, heads, n*g, D): the groups are
        folded into the batch, (b*n, heads, g, D), so each runs as a sequence of its own."""
        b, n = q.shape[0], q.shape[2] // g
        y = attention(*(x.unflatten(2, (n, g)).transpose(1, 2).flatten(0, 1) for x in (q, k, v)),
                      impl, None, dropout_p)
        return y.unflatten(0, (b, n)).transpose(1, 2).flatten(2, 3)

    plain = grouped(q[:, :h], k[:, :hk], v[:, :hk], G)
    # shifted half: a half group [0, s), full groups [s, s+G), ..., [T-G-s, T-s), a half group [T-s, T).
    # The full groups are the middle T-G tokens cut in groups of G; the two half groups have the same
    # length s, so they go together as one batch of 2B sequences (no wrap-around: ends never meet).
    qs, ks, vs = q[:, h:], k[:, hk:], v[:, hk:]
    first, last = grouped(*(torch.cat([x[:, :, :s], x[:, :, T - s:]]) for x in (qs, ks, vs)), s).chunk(2)
    middle = [grouped(*(x[:, :, s:T - s] for x in (qs, ks, vs)), G)] if T > G else []
    shifted = torch.cat([first, *middle, last], dim=2)
    return torch.cat([plain, shifted], dim=1)


def enable_s2_attn(model, group_size):
    """S2-Attn in every layer while training (model.train()); eval and generation keep full attention."""
    import functools
    attns = [m for m in model.modules() if hasattr(m, "train_attn_fn")]
    if not attns:
        raise SystemExit("--s2_attn: model.py's Attention has no `train_attn_fn` hook")
    for m in attns:
        m.train_attn_fn = functools.partial(s2_attention, group_size=group_size)


# ----------------------------------------------------------------------------- main

def get_parser():
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("fine-tuning")
    g.add_argument("--init_from", required=True, help="base checkpoint folder: ours, or a HF Llama / GPT-NeoX folder")
    g.add_argument("--train_data", required=True, help="SFT token files of dataset_sft.py prepare (X.bin / X.json / X)")
    g.add_argument("--val_data", default=None, help="SFT validation token files (none: no eval)")
    g.add_argument("--tokenizer", default=None, help="tokenizer the SFT files were made with (default: the one in --init_from)")
    g.add_argument("--max_seq_len", type=int, default=None, help="row length in tokens (default: the base's trained length)")
    g.add_argument("--sft_mode", default="packing", choices=["packing", "padding"],
                   help="several samples per row (attention stays within each) or one right-padded sample per row")
    g.add_argument("--rope_scaling", type=json.loads, default=None,
                   help='RoPE scaling for a longer context, HF style, e.g. \'{"rope_type":"yarn","factor":2}\' '
                        "(linear | dynamic | yarn)")
    g.add_argument("--s2_attn", type=str2bool, default=False,
                   help="LongLoRA shifted sparse attention while training: groups of max_seq_len/4 tokens, half "
                        "the heads shifted by half a group (needs --sft_mode padding)")
    g.add_argument("--attn_impl", default="auto", help=f"attention backend: {' | '.join(ATTN_IMPLS)}")
    g.add_argument("--lora", type=str2bool, default=False, help="train a LoRA adapter (peft) instead of all weights")
    g.add_argument("--lora_r", type=int, default=8, help="LoRA rank r")
    g.add_argument("--lora_alpha", type=float, default=16, help="LoRA alpha; the update is scaled by alpha / r")
    g.add_argument("--lora_dropout", type=float, default=0.05, help="dropout on the LoRA branch's input")
    g.add_argument("--lora_targets", default=None,
                   help="comma-separated Linear names to adapt (default: llama " + DEFAULT_TARGETS["llama"] +
                        "; neox " + DEFAULT_TARGETS["neox"] + ")")
    g.add_argument("--merge", type=str2bool, default=False,
                   help="after LoRA training also write the merged weights as a checkpoint folder")
    g.add_argument("--merge_dir", default=None, help="where --merge writes (default: OUT_DIR/merged)")
    add_train_args(p)
    # fine-tuning defaults: a short run at a small learning rate from a trained model
    p.set_defaults(out_dir="out/sft", max_steps=500, lr=2e-5, min_lr=2e-6, warmup_steps=20, weight_decay=0.0,
                   eval_interval=100, save_interval=200)
    return p


def check_args(args):
    if args.s2_attn and args.sft_mode != "padding":
        raise SystemExit("--s2_attn: needs --sft_mode padding (shifted groups would cross packed samples)")
    if args.merge and not args.lora:
        raise SystemExit("--merge: only with --lora True (full fine-tuning already writes plain weights)")
    for flag in ("lora_r", "max_seq_len"):
        v = getattr(args, flag)
        if v is not None and v <= 0:
            raise SystemExit(f"--{flag} {v}: must be positive")
    if not 0 <= args.lora_dropout < 1:
        raise SystemExit(f"--lora_dropout {args.lora_dropout}: must be in [0, 1)")
    if args.rope_scaling is not None and not isinstance(args.rope_scaling, dict):
        raise SystemExit(f"--rope_scaling {args.rope_scaling!r}: expected a JSON object")


def build_model(args, device):
    """The base (with --max_seq_len / --rope_scaling / --s2_attn) and, with --lora, the PeftModel around it
    (None otherwise). The model to train is the first: the LoRA layers sit inside it."""
    # S2-Attn needs plain causal rows (mask None) and calls causal attention per group; flex would get a
    # causal block mask built for the full length instead, so with --s2_attn "auto"/"flex" becomes sdpa
    # (flash / cuDNN kernels on GPU)
    attn_impl = "sdpa" if args.s2_attn and args.attn_impl in ("auto", "flex") else args.attn_impl
    try:
        model = load_base(args.init_from, args.max_seq_len, args.rope_scaling, attn_impl)
    except ValueError as e:
        raise SystemExit(f"--rope_scaling / --max_seq_len: {e}")
    T = model.args.max_seq_len
    if args.s2_attn:
        if T % 4:
            raise SystemExit(f"--s2_attn: --max_seq_len {T} must be divisible by 4 (group size max_seq_len/4)")
        enable_s2_attn(model, T // 4)
    if not args.lora:
        return model, None
    dtype = resolve_dtype(args, device)
    if dtype != "float32" and not args.use_deepspeed:
        # the frozen base needs no fp32 master copy: keep it in the training dtype (half the memory);
        # peft keeps the adapter itself in fp32 and autocast mixes the two
        model.to(getattr(torch, dtype))
    return model, add_lora(model, args.init_from, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_targets)


def main(argv=None):
    args = get_parser().parse_args(argv)
    check_args(args)
    from tokenizer import Tokenizer
    dist = setup_distributed(args)
    seed_everything(args.seed)
    model, peft_model = build_model(args, dist.device)  # first: it names a --init_from that is no checkpoint
    tokenizer = Tokenizer(args.tokenizer or args.init_from)
    T = model.args.max_seq_len
    if tokenizer.vocab_size > model.args.vocab_size:
        raise SystemExit(f"--tokenizer {tokenizer.path}: vocab_size {tokenizer.vocab_size} exceeds the model's "
                         f"{model.args.vocab_size}")
    kw = {}
    if peft_model is not None:  # checkpoints hold the adapter only
        kw = {"save_model": lambda m, folder, tok: save_adapter(peft_model, folder),
              "load_model": lambda m, folder: load_adapter(peft_model, folder)}
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print0(f"base: {args.init_from}\nmax_seq_len: {T}\nrope_scaling: {json.dumps(model.args.rope_scaling)}\n"
           f"trainable_params: {n_train}\nall_params: {model.num_params()}")

    rows_per_step = args.batch_size * args.grad_accum * dist.world_size
    data = dict(max_seq_len=T, seed=args.seed, vocab_size=tokenizer.vocab_size, tokenizer_hash=tokenizer.file_hash)
    train_data = SFTBatches(args.train_data, mode=args.sft_mode, rows_per_step=rows_per_step, **data)
    val_data = SFTBatches(args.val_data, mode=args.sft_mode, rows_per_step=rows_per_step, shuffle=False,
                          **data) if args.val_data else None
    print0(f"train_samples: {train_data.ds.stats['samples']}\ntrain_rows_per_epoch: {len(train_data.ds)}")

    tokenizer_path = args.tokenizer or args.init_from  # a folder: all its tokenizer files are copied
    result = train(args, model, train_data, val_data, tokenizer_path=tokenizer_path, **kw)
    if args.lora and args.merge and dist.is_main:
        merge_dir = args.merge_dir or os.path.join(args.out_dir, "merged")
        merge_adapter(args.init_from, args.out_dir, merge_dir, tokenizer_path, max_seq_len=args.max_seq_len,
                      rope_scaling=args.rope_scaling, attn_impl=args.attn_impl)
        result["merged"] = merge_dir
    for k, v in result.items():
        print0(f"{k}: {v}")
    return result


if __name__ == "__main__":
    main()
