"""
LoRA (through peft) and LongLoRA's shifted sparse attention: the model fine_tuning.py trains, and the
adapter loading that eval.py shares.

LoRA: W x + (alpha / r) * B A x with A (r x in), B (out x r), B = 0 at the start; only A and B train.
An adapter folder is peft's format (adapter_config.json + adapter_model.safetensors) with
base_model_name_or_path = the base folder, so any peft user loads it with
PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter). Merging writes
W + (alpha / r) B A into the weights, so a merged model decodes at the base's cost.

    model = load_base(folder, max_seq_len=8192, rope_scaling={"rope_type": "yarn", "factor": 4})
    peft_model = add_lora(model, folder, r=8, alpha=16)     # model now holds the LoRA layers
    save_adapter(peft_model, out) / load_adapter(peft_model, out)
    merged = merge_lora(Transformer.from_pretrained(base), adapter_folder)   # a plain Transformer
"""
import functools
import json
import os

import torch

from attention import ATTN_IMPLS, attention, repeat_kv
from cli import add_flag, positive_int
from checkpoint import atomic_files, head_name
from model import Transformer
from trainer import resolve_dtype

# peft target module names (the last part of a module's name) per architecture: attention and MLP
# projections; GQA's narrower k/v projections included
DEFAULT_TARGETS = {"llama": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                   "neox": "query_key_value,dense,dense_h_to_4h,dense_4h_to_h"}
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# trainer.py flags' defaults for fine-tuning: a short run at a small learning rate from a trained model
FINETUNE_DEFAULTS = dict(out_dir="out/sft", max_steps=500, lr=2e-5, min_lr=2e-6, warmup_steps=20, weight_decay=0.0,
                         eval_interval=100, save_interval=200)


# ----------------------------------------------------------------------------- LoRA

def load_base(folder, max_seq_len=None, rope_scaling=None, attn_impl="auto", dtype=torch.float32):
    """The base model, optionally with a longer context (a new YaRN scaling keeps the base's trained
    length as its L0, see Transformer.from_pretrained)."""
    overrides = {"attn_impl": attn_impl}
    if max_seq_len:
        overrides["max_seq_len"] = max_seq_len
    if rope_scaling:
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
    head = head_name(model.args.arch)
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
    atomic_files(folder, peft_model.save_pretrained, ADAPTER_FILES)


def load_adapter(peft_model, folder, flag="--resume"):
    """Adapter weights of `folder` into the injected LoRA layers (resume, merge); every LoRA tensor checked.
    `flag` names the command-line flag an error message points at."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    path = os.path.join(folder, "adapter_model.safetensors")
    if not os.path.exists(path):
        raise SystemExit(f"{flag}: {path} missing (was this run started without --lora?)")
    result = set_peft_model_state_dict(peft_model, load_file(path))
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise SystemExit(f"{flag}: {path} does not match --lora_r/--lora_targets "
                         f"(unexpected {result.unexpected_keys[:3]}, missing {missing[:3]})")


def merge_lora(model, adapter_folder, flag="--adapter"):
    """`model` with the adapter of `adapter_folder` merged in: W' = W + (alpha / r) B A for every adapted
    Linear, so decoding pays nothing. Returns the plain model (peft's wrapper removed)."""
    from peft import LoraConfig, PeftModel
    if not os.path.isfile(os.path.join(adapter_folder, "adapter_config.json")):
        raise SystemExit(f"{flag} {adapter_folder}: no adapter_config.json (not a peft adapter folder)")
    # PeftModel itself, whatever the adapter's task_type: peft wraps any nn.Module whose submodule names
    # match the adapter's target_modules (q_proj, ...); PeftModelForCausalLM would want HF's generation API
    peft_model = PeftModel(model, LoraConfig.from_pretrained(adapter_folder))
    load_adapter(peft_model, adapter_folder, flag)
    return peft_model.merge_and_unload()


def merge_adapter(base_folder, adapter_dir, out, tokenizer_path, **base_kwargs):
    """W <- W + (alpha / r) B A in fp32 on a fresh copy of the base, written as a plain checkpoint folder."""
    merged = merge_lora(load_base(base_folder, **base_kwargs), adapter_dir, flag="--merge")
    merged.save_pretrained(out, tokenizer_path=tokenizer_path)
    return merged


# ----------------------------------------------------------------------------- LongLoRA S2-Attn

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
    attns = [m for m in model.modules() if hasattr(m, "train_attn_fn")]
    if not attns:
        raise SystemExit("--s2_attn: model.py's Attention has no `train_attn_fn` hook")
    for m in attns:
        m.train_attn_fn = functools.partial(s2_attention, group_size=group_size)


# ----------------------------------------------------------------------------- the fine-tuned model from flags

def add_args(parser):
    """The flags build_model reads: the base, its context, the attention and LoRA."""
    g = parser.add_argument_group("model: base, long context, LoRA (lora.py)")
    g.add_argument("--init_from", help="base checkpoint folder: ours, a HF Llama / GPT-NeoX folder or a step_N/ "
                   "(default: the pretrained model of the newest `bash run.sh`, out/latest.json)")
    g.add_argument("--max_seq_len", type=positive_int, default=None, help="row length in tokens (default: the base's trained length)")
    g.add_argument("--rope_scaling", type=json.loads, default=None,
                   help='RoPE scaling for a longer context, HF style, e.g. \'{"rope_type":"yarn","factor":2}\' '
                        "(linear | dynamic | yarn)")
    add_flag(g, "--s2_attn", False,
             "LongLoRA shifted sparse attention while training: groups of max_seq_len/4 tokens, half "
             "the heads shifted by half a group (needs plain rows: fine_tuning.py --sft_mode padding)")
    g.add_argument("--attn_impl", default="auto", help=f"attention backend: {' | '.join(ATTN_IMPLS)}")
    add_flag(g, "--lora", False, "train a LoRA adapter (peft) instead of all weights")
    g.add_argument("--lora_r", type=positive_int, default=8, help="LoRA rank r")
    g.add_argument("--lora_alpha", type=float, default=16, help="LoRA alpha; the update is scaled by alpha / r")
    g.add_argument("--lora_dropout", type=float, default=0.05, help="dropout on the LoRA branch's input")
    g.add_argument("--lora_targets", default=None,
                   help="comma-separated Linear names to adapt (default: llama " + DEFAULT_TARGETS["llama"] +
                        "; neox " + DEFAULT_TARGETS["neox"] + ")")
    return parser


def check_args(args):
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
