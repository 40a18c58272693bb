"""Convert checkpoints between our folders, Hugging Face folders and Meta's raw Llama weights.

  python convert.py HF_FOLDER out/llama           # HF Llama-family / GPT-NeoX folder -> ours
  python convert.py META_FOLDER out/llama         # consolidated.NN.pth + params.json -> ours
  python convert.py out/model out/hf --to hf      # ours -> a plain HF folder (Llama or GPT-NeoX)

Our folder already loads in transformers (config.json has the HF keys); `--to hf` only leaves out our
own "model_args" key. The weights themselves are the same tensors in every direction (tested bit-exact).
"""
import glob
import os
import re
from dataclasses import asdict

import torch

import cli
from checkpoint import (atomic_write, copy_files, head_name, model_folder, read_config, read_tensors,
                        tokenizer_files, write_json)
from model import ModelArgs, Transformer

# Meta's params.json keys we understand (anything else is a model this file cannot reproduce)
META_KEYS = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
             "norm_eps", "rope_theta", "use_scaled_rope", "rope_scaling_factor", "max_seq_len", "max_batch_size"}

# Meta tensor-parallel shards (fairscale): column-parallel weights are split along the output rows (dim 0),
# row-parallel ones along the input columns (dim 1); norms are replicated in every shard.
META_SPLIT_DIM = {"attention.wq": 0, "attention.wk": 0, "attention.wv": 0, "feed_forward.w1": 0,
                  "feed_forward.w3": 0, "output": 0, "attention.wo": 1, "feed_forward.w2": 1}

META_TO_HF = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
              "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
              "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
              "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm",
              "ffn_norm": "post_attention_layernorm"}


def meta_to_hf_rope_layout(w, n_heads):
    """Meta rotates adjacent pairs (2i, 2i+1) of each head; HF rotate-half pairs (i, i + d/2). Regroup the
    output rows of wq/wk so that the same pairs land in HF's layout: per head (d/2, 2) -> (2, d/2)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def merge_meta_shards(shards, dim):
    """One state dict from the tensor-parallel shards: concatenate split weights, keep replicated ones once."""
    merged = {}
    for key in shards[0]:
        if key == "rope.freqs":  # a precomputed buffer in Llama 1 checkpoints
            continue
        parts = [s[key] for s in shards]
        name = key.removeprefix("layers.").split(".", 1)[-1].removesuffix(".weight") if key.startswith("layers.") \
            else key.removesuffix(".weight")
        if len(parts) == 1 or parts[0].ndim == 1:
            merged[key] = parts[0]
        elif name == "tok_embeddings":  # Llama 2 splits the embedding width, Llama 3 the vocabulary
            merged[key] = torch.cat(parts, dim=0 if parts[0].shape[1] == dim else 1)
        elif name in META_SPLIT_DIM:
            merged[key] = torch.cat(parts, dim=META_SPLIT_DIM[name])
        else:
            raise SystemExit(f"convert.py: unknown Meta weight {key!r}")
    return merged


def read_params(path) -> dict:
    """Meta's params.json, checked: JSON, known keys, positive integer sizes (a one-line SystemExit otherwise)."""
    params = cli.read_json_object(path)
    unknown = sorted(set(params) - META_KEYS)
    if unknown:
        raise SystemExit(f"{path}: {unknown[0]}: not supported")
    for key in ("dim", "n_layers", "n_heads", "n_kv_heads"):
        v = params.get(key)
        if (v is not None or key != "n_kv_heads") and not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
            raise SystemExit(f"{path}: {key}: {'missing' if v is None else repr(v) + ' is not a positive integer'}")
    return params


def load_meta(folder, max_seq_len):
    """Meta's raw release (params.json + consolidated.NN.pth) -> (ModelArgs, HF-named state dict)."""
    params = read_params(os.path.join(folder, "params.json"))
    paths = sorted(glob.glob(os.path.join(folder, "consolidated.*.pth")))
    shards = [read_tensors(p) for p in paths]
    dim, n_heads = params["dim"], params["n_heads"]
    n_kv_heads = params.get("n_kv_heads") or n_heads
    if dim % n_heads or n_heads % n_kv_heads:
        raise SystemExit(f"{folder}/params.json: dim {dim}, n_heads {n_heads}, n_kv_heads {n_kv_heads} must divide evenly")
    sd = merge_meta_shards(shards, dim)
    if sd.get("tok_embeddings.weight") is None or sd["tok_embeddings.weight"].shape[1] != dim:
        raise SystemExit(f"{folder}: the weights are not those of params.json (no tok_embeddings of width dim {dim})")
    rope_scaling = None
    if params.get("use_scaled_rope"):  # Llama 3.1 frequency scaling, Meta's constants
        rope_scaling = {"rope_type": "llama3", "factor": params.get("rope_scaling_factor") or 8.0,
                        "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    vocab_size, _ = sd["tok_embeddings.weight"].shape
    args = ModelArgs(arch="llama", dim=dim, n_layers=params["n_layers"], n_heads=n_heads, n_kv_heads=n_kv_heads,
                     vocab_size=vocab_size, hidden_dim=sd["layers.0.feed_forward.w1.weight"].shape[0],
                     norm_eps=params.get("norm_eps", 1e-5), rope_theta=params.get("rope_theta", 10000.0),
                     rope_scaling=rope_scaling, max_seq_len=params.get("max_seq_len") or max_seq_len,
                     tie_word_embeddings="output.weight" not in sd)
    state = {"model.embed_tokens.weight": sd.pop("tok_embeddings.weight"), "model.norm.weight": sd.pop("norm.weight")}
    if "output.weight" in sd:
        state[head_name("llama") + ".weight"] = sd.pop("output.weight")
    for key, w in sd.items():
        m = re.fullmatch(r"layers\.(\d+)\.(.+)\.weight", key)
        if m is None or m.group(2) not in META_TO_HF:
            raise SystemExit(f"convert.py: unknown Meta weight {key!r}")
        if m.group(2) == "attention.wq":
            w = meta_to_hf_rope_layout(w, n_heads)
        elif m.group(2) == "attention.wk":
            w = meta_to_hf_rope_layout(w, n_kv_heads)
        state[f"model.layers.{m.group(1)}.{META_TO_HF[m.group(2)]}.weight"] = w
    return args, state


def detect_format(folder):
    if os.path.exists(os.path.join(folder, "params.json")) and glob.glob(os.path.join(folder, "consolidated.*.pth")):
        return "meta"
    if not os.path.exists(os.path.join(folder, "config.json")):
        raise SystemExit(f"{folder}: neither config.json nor params.json + consolidated.*.pth")
    return "ours" if "model_args" in read_config(folder) else "hf"


def convert(src, dst, to="ours", dtype="auto", tokenizer=None, max_seq_len=4096, **overrides):
    """Read src (any format, a trainer's step_N/ too), write dst as our folder or (to="hf") a plain
    transformers folder."""
    src = model_folder(src)
    fmt = detect_format(src)
    dtype = dtype if dtype == "auto" else cli.torch_dtype(dtype)
    if fmt == "meta":
        args, state = load_meta(src, max_seq_len)
        args = ModelArgs(**{**asdict(args), **overrides})
        model = Transformer(args)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or set(missing) - ({head_name("llama") + ".weight"} if args.tie_word_embeddings else set()):
            raise SystemExit(f"{src}: weights do not match params.json (missing {missing[:3]}, unexpected {unexpected[:3]})")
        model = model.to(next(iter(state.values())).dtype if dtype == "auto" else dtype)
    else:
        model = Transformer.from_pretrained(src, dtype=dtype, **overrides)
    model.save_pretrained(dst)
    copy_files([tokenizer] if tokenizer else tokenizer_files(src), dst)
    if to == "hf":  # transformers ignores our key anyway; a plain HF folder just does not carry it
        config = read_config(dst)
        config.pop("model_args")
        atomic_write(os.path.join(dst, "config.json"), lambda p: write_json(config, p))
    return fmt, model


@cli.boundary
def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("src", help="source folder: ours, a HF Llama/GPT-NeoX folder, or Meta's raw release")
    p.add_argument("dst", help="output folder")
    p.add_argument("--to", choices=["ours", "hf"], default="ours",
                   help="ours: config.json with our model_args too; hf: a plain transformers folder")
    p.add_argument("--dtype", choices=[*cli.DTYPES, "auto"], default="auto", help="weight dtype (auto keeps the stored one)")
    p.add_argument("--tokenizer", default=None, help="tokenizer file to copy in (default: the one in src, if any)")
    p.add_argument("--max_seq_len", type=cli.positive_int, default=4096,
                   help="trained context for Meta checkpoints (params.json does not record it)")
    a = p.parse_args(argv)
    if not os.path.isdir(a.src):
        raise SystemExit(f"convert.py: src {a.src!r} is not a folder")
    if a.tokenizer and not os.path.exists(a.tokenizer):
        raise SystemExit(f"convert.py: --tokenizer {a.tokenizer!r} does not exist")
    cli.check_out_dir(a.dst, "dst")
    fmt, model = convert(a.src, a.dst, a.to, a.dtype, a.tokenizer, a.max_seq_len)
    print(f"from: {fmt}")
    print(f"to: {a.to}")
    print(f"arch: {model.args.arch}")
    print(f"params: {model.num_params()}")
    print(f"dtype: {str(model.embed.weight.dtype).removeprefix('torch.')}")
    print(f"out: {a.dst}")


if __name__ == "__main__":
    main()
