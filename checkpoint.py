"""Checkpoint folders on disk: what model.py's save_pretrained / from_pretrained do, without the model class.

A folder holds config.json (transformers' keys plus ours under "model_args"), model.safetensors (or HF's
shards / pytorch_model.bin when reading) and the tokenizer files. Here:

  hf_config, hf_rope_parameters    ModelArgs -> the transformers config.json
  args_from_config                 our or a transformers Llama / GPT-NeoX config.json -> ModelArgs fields
  load_state_dict, load_weights    the tensors of a folder, and into a model (GPTQ folders through gptq.py)
  save_folder, read_config         weights + config + tokenizer files; config.json back
  atomic_write, atomic_dir,        write to a temp name, then rename: a crash never leaves half a file
  atomic_files                     (a file; a whole folder; files moved into a folder one by one)
  head_name                        the output head's name per architecture (lm_head / embed_out)
"""
import json
import os
import shutil

import torch

from gptq import load_quantized
from rope import ntk_base

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# buffers of old HF checkpoints (RoPE frequencies, causal masks) that the model recomputes
RECOMPUTED_BUFFERS = ("rotary_emb.inv_freq", "attention.bias", "attention.masked_bias")


def head_name(arch: str) -> str:
    """The output projection's module name: transformers' Llama calls it lm_head, GPT-NeoX embed_out."""
    return "lm_head" if arch == "llama" else "embed_out"


# ----------------------------------------------------------------------------- writing

def atomic_write(path, write, suffix=".tmp"):
    """write(path + suffix), then rename it to path, so a crash never leaves a half-written file under the
    real name. suffix: of the temp name (a writer that picks the format by extension wants ".tmp.png")."""
    tmp = path + suffix
    write(tmp)
    os.replace(tmp, path)


def atomic_dir(folder, write, suffix=".tmp"):
    """write(folder + suffix) into a fresh temp folder, then put it in place of `folder` (removed first)."""
    folder = folder.rstrip("/")
    tmp = folder + suffix
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def atomic_files(folder, write, tmp, names=None):
    """write(tmp) into a fresh temp folder, then move its files (or just `names`) into `folder` one by one, so
    each appears there whole; the other files of `folder` stay."""
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    os.makedirs(folder, exist_ok=True)
    for name in names or os.listdir(tmp):
        os.replace(os.path.join(tmp, name), os.path.join(folder, name))
    shutil.rmtree(tmp)


def write_json(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def save_folder(folder, state: dict, config: dict, tokenizer_path=None):
    """config.json, model.safetensors (state) and the tokenizer files of tokenizer_path (a file or a folder)."""
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    atomic_write(os.path.join(folder, "model.safetensors"), lambda p: save_file(state, p, metadata={"format": "pt"}))
    atomic_write(os.path.join(folder, "config.json"), lambda p: write_json(config, p))
    if tokenizer_path:
        # a tokenizer file comes with its siblings: transformers needs tokenizer.json and its config
        # to keep the chat-role tokens whole (rebuilt from tokenizer.model alone, it splits them)
        src = tokenizer_path if os.path.isdir(tokenizer_path) else os.path.dirname(tokenizer_path)
        files = set(tokenizer_files(src))
        if not os.path.isdir(tokenizer_path):
            files.add(tokenizer_path)
        copy_files(files, folder)


def tokenizer_files(folder) -> list[str]:
    """The tokenizer files present in a folder."""
    return [os.path.join(folder, f) for f in TOKENIZER_FILES if os.path.exists(os.path.join(folder, f))]


def copy_files(files, folder):
    """Copy each file into folder (atomically), unless it is already there."""
    for f in files:
        dst = os.path.join(folder, os.path.basename(f))
        if os.path.abspath(f) != os.path.abspath(dst):
            atomic_write(dst, lambda p, f=f: shutil.copyfile(f, p))


# ----------------------------------------------------------------------------- reading

def read_config(folder) -> dict:
    """config.json of a checkpoint folder; a one-line SystemExit naming the file when there is none."""
    config_path = os.path.join(folder, "config.json")
    if not os.path.exists(config_path):
        raise SystemExit(f"{config_path}: no config.json (not a checkpoint folder)")
    with open(config_path) as f:
        return json.load(f)


def load_state_dict(folder) -> dict:
    """Tensors of a checkpoint folder: model.safetensors, a sharded *.safetensors.index.json, or pytorch_model.bin."""
    from safetensors.torch import load_file
    single = os.path.join(folder, "model.safetensors")
    if os.path.exists(single):
        return load_file(single)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = os.path.join(folder, index_name)
        if os.path.exists(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            state = {}
            for s in shards:
                path = os.path.join(folder, s)
                state.update(load_file(path) if s.endswith(".safetensors")
                             else torch.load(path, map_location="cpu", weights_only=True))
            return state
    binary = os.path.join(folder, "pytorch_model.bin")
    if os.path.exists(binary):
        return torch.load(binary, map_location="cpu", weights_only=True)
    raise SystemExit(f"{folder}: no model.safetensors, sharded index or pytorch_model.bin")


def load_weights(model, state: dict, config: dict, folder):
    """The tensors of `folder` (state, its config) into a freshly built model, every name checked. A GPTQ
    folder (config has "quantization_config") swaps the model's Linear layers for gptq.QuantLinear first."""
    args = model.args
    head = head_name(args.arch) + ".weight"
    if config.get("quantization_config"):
        return load_quantized(model, state, config["quantization_config"],
                              tied_head=head if args.tie_word_embeddings else None)
    if args.tie_word_embeddings:
        state.pop(head, None)  # HF ignores a stored copy of a tied head too
    state = {k: v for k, v in state.items() if not k.endswith(RECOMPUTED_BUFFERS)}
    expected = set(model.state_dict()) - ({head} if args.tie_word_embeddings else set())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise SystemExit(f"{folder}: weights do not match the config (missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]})")
    model.load_state_dict(state, strict=False)
    return model


# ----------------------------------------------------------------------------- HF config mapping

def hf_rope_parameters(args) -> dict:
    """rope_parameters as transformers 5 reads them (rope_theta inside). Our fixed-alpha "ntk" is not an HF
    type, but it is exactly the default RoPE with the stretched base, so it exports as that."""
    rs = dict(args.rope_scaling or {"rope_type": "default"})
    theta = args.rope_theta
    if rs["rope_type"] == "ntk":
        rs, theta = {"rope_type": "default"}, ntk_base(theta, rs["factor"], int(args.head_dim * args.rotary_pct))
    params = {**rs, "rope_theta": theta}
    if args.arch == "neox":
        params["partial_rotary_factor"] = args.rotary_pct
    return params


def hf_config(args) -> dict:
    """The transformers config.json of a ModelArgs (transformers 4 keys kept beside rope_parameters)."""
    rope = hf_rope_parameters(args)
    common = dict(vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.hidden_dim,
                  num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
                  max_position_embeddings=args.max_seq_len, tie_word_embeddings=args.tie_word_embeddings,
                  bos_token_id=args.bos_id, eos_token_id=args.eos_id, pad_token_id=args.pad_id,
                  rope_parameters=rope, rope_theta=rope["rope_theta"], initializer_range=0.02, use_cache=True)
    legacy_scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
    common["rope_scaling"] = legacy_scaling if legacy_scaling["rope_type"] != "default" else None
    if args.arch == "llama":
        return dict(architectures=["LlamaForCausalLM"], model_type="llama", **common,
                    num_key_value_heads=args.n_kv_heads, head_dim=args.head_dim, hidden_act="silu",
                    rms_norm_eps=args.norm_eps, attention_bias=False, mlp_bias=False,
                    attention_dropout=args.dropout)
    return dict(architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox", **common, hidden_act="gelu",
                layer_norm_eps=args.norm_eps, use_parallel_residual=args.use_parallel_residual,
                rotary_pct=args.rotary_pct, rotary_emb_base=rope["rope_theta"], attention_bias=True,
                attention_dropout=args.dropout, hidden_dropout=args.dropout)


def args_from_config(config: dict) -> dict:
    """ModelArgs fields (a dict) from our config.json ("model_args") or a transformers Llama / GPT-NeoX one.
    Anything this model cannot reproduce is a ValueError naming the config key."""
    if "model_args" in config:
        return dict(config["model_args"])
    model_type = config.get("model_type")
    if model_type not in ("llama", "gpt_neox"):
        raise ValueError(f"model_type: {model_type!r} is not supported (llama | gpt_neox)")

    def require(key, allowed, default):
        if config.get(key, default) not in allowed:
            raise ValueError(f"{key}: {config.get(key)!r} is not supported (expected {allowed[0]!r})")

    dim, n_heads = config["hidden_size"], config["num_attention_heads"]
    # rope: transformers 5 "rope_parameters" (theta inside) or the legacy "rope_scaling" + "rope_theta"
    rope = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
    theta = (config.get("rope_parameters") or {}).get("rope_theta") or rope.get("rope_theta") or \
        config.get("rope_theta") or config.get("rotary_emb_base") or 10000.0
    common = dict(dim=dim, n_layers=config["num_hidden_layers"], n_heads=n_heads,
                  vocab_size=config["vocab_size"], hidden_dim=config["intermediate_size"],
                  max_seq_len=config.get("max_position_embeddings", 2048), rope_theta=float(theta),
                  rope_scaling=rope or None, tie_word_embeddings=config.get("tie_word_embeddings", False),
                  bos_id=_first(config.get("bos_token_id"), 1), eos_id=_first(config.get("eos_token_id"), 2),
                  pad_id=_first(config.get("pad_token_id"), 0))
    if model_type == "llama":
        require("hidden_act", ["silu"], "silu")
        require("attention_bias", [False], False)
        require("mlp_bias", [False], False)
        if config.get("head_dim") not in (None, dim // n_heads):
            raise ValueError(f"head_dim: {config['head_dim']} != hidden_size / num_attention_heads")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("rope_parameters.partial_rotary_factor: partial rotary is not supported for llama")
        return dict(arch="llama", n_kv_heads=config.get("num_key_value_heads") or n_heads,
                    norm_eps=config.get("rms_norm_eps", 1e-6), **common)
    require("hidden_act", ["gelu"], "gelu")
    require("attention_bias", [True], True)
    pct = (config.get("rope_parameters") or {}).get("partial_rotary_factor") or config.get("rotary_pct", 0.25)
    return dict(arch="neox", norm_eps=config.get("layer_norm_eps", 1e-5), rotary_pct=float(pct),
                use_parallel_residual=config.get("use_parallel_residual", True), **common)


def _first(x, default):  # HF allows a list of eos ids; we keep the first
    if isinstance(x, list):
        return x[0] if x else default
    return default if x is None else x
