"""Checkpoint folders on disk: what model.py's save_pretrained / from_pretrained do, without the model class.

A folder holds config.json (transformers' keys plus ours under "model_args"), model.safetensors (or HF's
shards / pytorch_model.bin when reading) and the tokenizer files. Here:

  hf_config, hf_rope_parameters    ModelArgs -> the transformers config.json
  args_from_config                 our or a transformers Llama / GPT-NeoX config.json -> ModelArgs fields
  load_state_dict, load_weights    the tensors of a folder, and into a model (GPTQ folders through gptq.py)
  save_folder, read_config         weights + config + tokenizer files; config.json back
  model_folder                     the checkpoint folder a path names (a trainer step_N/ holds it in model/)
  atomic_write, atomic_dir,        write to a temp name, then rename: a crash never leaves half a file
  atomic_files                     (a file; a new folder; files moved into a folder one by one), with the
                                   umask's file mode; nothing already there is deleted
  head_name                        the output head's name per architecture (lm_head / embed_out)
"""
import contextlib
import json
import os
import re
import shutil
import tempfile

import torch

from cli import read_json_object
from gptq import load_quantized
from rope import ntk_base

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# buffers of old HF checkpoints (RoPE frequencies, causal masks) that the model recomputes
RECOMPUTED_BUFFERS = ("rotary_emb.inv_freq", "attention.bias", "attention.masked_bias")


def head_name(arch: str) -> str:
    """The output projection's module name: transformers' Llama calls it lm_head, GPT-NeoX embed_out."""
    return "lm_head" if arch == "llama" else "embed_out"


# ----------------------------------------------------------------------------- writing

def file_mode() -> int:
    """The mode open() gives a new file: 0o666 less the process umask (reading the umask means setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def apply_umask(path):
    """Give `path` (a file, or every file under a folder) the umask's mode: some writers (safetensors'
    save_file) create their files 0600 whatever the umask, and a temp-then-rename keeps that mode."""
    files = [path] if os.path.isfile(path) else [os.path.join(d, n) for d, _, names in os.walk(path) for n in names]
    for f in files:
        os.chmod(f, file_mode())


def atomic_write(path, write, suffix=".tmp"):
    """write(path + suffix), then rename it to path, so a crash never leaves a half-written file under the
    real name. suffix: of the temp name (a writer that picks the format by extension wants ".tmp.png")."""
    tmp = path + suffix
    write(tmp)
    apply_umask(tmp)
    os.replace(tmp, path)


@contextlib.contextmanager
def staging_dir(near):
    """A fresh private folder beside `near` (same file system, so a rename out of it is atomic), removed at
    the end with whatever is left in it; a killed process leaves it as NAME.tmp.XXXXXX, never under NAME."""
    near = os.path.abspath(near.rstrip("/"))
    os.makedirs(os.path.dirname(near), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=os.path.basename(near) + ".tmp.", dir=os.path.dirname(near))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def atomic_dir(folder, write):
    """write(tmp) into a new folder, then rename it to `folder` in one step. `folder` must be absent or empty:
    what is already there is never deleted or replaced (a SystemExit naming it)."""
    folder = os.path.abspath(folder.rstrip("/"))
    with staging_dir(folder) as staging:
        tmp = os.path.join(staging, os.path.basename(folder))
        write(tmp)
        apply_umask(tmp)
        try:
            os.rename(tmp, folder)  # replaces an empty folder only (rename(2)); anything else is an OSError
        except OSError as e:
            raise SystemExit(f"{folder}: exists and is not empty, not replaced ({e.strerror})") from None


def atomic_files(folder, write, names=None):
    """write(tmp) into a fresh temp folder, then move its files (or just `names`) into `folder` one by one, so
    each appears there whole; the other files of `folder` stay."""
    with staging_dir(folder) as staging:
        tmp = os.path.join(staging, "files")
        write(tmp)
        apply_umask(tmp)
        os.makedirs(folder, exist_ok=True)
        for name in names or os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(folder, name))


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

def model_folder(path) -> str:
    """The checkpoint folder `path` names: path itself, or path/model for a trainer checkpoint
    (out_dir/step_N/ keeps its weights in model/, its optimizer state in state/). Anything else comes
    back unchanged, so the caller's "no config.json" message names what the user passed."""
    if path and not os.path.isfile(os.path.join(path, "config.json")) and \
            os.path.isfile(os.path.join(path, "model", "config.json")):
        return os.path.join(path, "model")
    return path


def read_config(folder) -> dict:
    """config.json of a checkpoint folder; a one-line SystemExit naming the file when there is none."""
    config_path = os.path.join(folder, "config.json")
    if not os.path.exists(config_path):
        raise SystemExit(f"{config_path}: no config.json (not a checkpoint folder)")
    return read_json_object(config_path)


def read_tensors(path) -> dict:
    """The tensors of one .safetensors / .bin / .pth file; a one-line SystemExit naming it when it is truncated
    or not such a file."""
    from safetensors.torch import load_file
    try:
        return load_file(path) if path.endswith(".safetensors") else \
            torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SystemExit(f"{path}: weights file not found")
    except Exception as e:  # SafetensorError, the zip reader's RuntimeError, UnpicklingError, EOFError
        why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise SystemExit(f"{path}: cannot read the weights, truncated or not a checkpoint file ({why})") from None


def load_state_dict(folder) -> dict:
    """Tensors of a checkpoint folder: model.safetensors, a sharded *.safetensors.index.json, or pytorch_model.bin."""
    single = os.path.join(folder, "model.safetensors")
    if os.path.exists(single):
        return read_tensors(single)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = os.path.join(folder, index_name)
        if os.path.exists(index):
            try:
                with open(index, encoding="utf-8") as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
            except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise SystemExit(f"{index}: not a shard index (JSON with a weight_map: {e})")
            state = {}
            for s in shards:
                state.update(read_tensors(os.path.join(folder, s)))
            return state
    binary = os.path.join(folder, "pytorch_model.bin")
    if os.path.exists(binary):
        return read_tensors(binary)
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
    own = model.state_dict()
    wrong = [k for k in state if tuple(state[k].shape) != tuple(own[k].shape)]
    if wrong:
        raise SystemExit(f"{folder}: weights do not match the config ({wrong[0]} is {tuple(state[wrong[0]].shape)}, "
                         f"the config makes it {tuple(own[wrong[0]].shape)})")
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


def args_from_config(config: dict, cls=None) -> dict:
    """ModelArgs fields (a dict) from our config.json ("model_args") or a transformers Llama / GPT-NeoX one.
    Anything this model cannot reproduce, a missing key or a value of the wrong type is a ValueError naming the
    config key. cls (ModelArgs): also check every field name and type against that dataclass."""
    try:
        kwargs = _args_from_config(config)
    except KeyError as e:
        raise ValueError(f"{e.args[0]}: missing") from None
    except (TypeError, AttributeError) as e:
        raise ValueError(f"not a model config ({e})") from None
    return kwargs if cls is None else check_fields(kwargs, cls)


def check_fields(kwargs: dict, cls) -> dict:
    """kwargs for the dataclass cls: known names, values of the annotated type, sizes > 0."""
    import dataclasses
    known = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    for key, v in kwargs.items():
        if key not in known:
            raise ValueError(f"{key}: not a {cls.__name__} field")
        kind = {type(None): "None"}.get(type(v), type(v).__name__)  # matched against the annotation text
        if not (kind in known[key] or (kind == "int" and "float" in known[key])):
            wanted = re.sub(r"<class '(\w+)'>", r"\1", known[key])  # "<class 'int'>" -> "int"
            raise ValueError(f"{key}: {v!r} is not of type {wanted}")
        if key in POSITIVE_FIELDS and v is not None and not v > 0:
            raise ValueError(f"{key}: {v!r} must be > 0")
    return kwargs


# sizes a model cannot have 0 of
POSITIVE_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "multiple_of",
                   "max_seq_len", "rope_theta", "norm_eps")


def _args_from_config(config: dict) -> dict:
    if "model_args" in config:
        if not isinstance(config["model_args"], dict):
            raise ValueError("model_args: expected a JSON object")
        return dict(config["model_args"])
    model_type = config.get("model_type")
    if model_type not in ("llama", "gpt_neox"):
        raise ValueError(f"model_type: {model_type!r} is not supported (llama | gpt_neox)")

    def require(key, allowed, default):
        if config.get(key, default) not in allowed:
            raise ValueError(f"{key}: {config.get(key)!r} is not supported (expected {allowed[0]!r})")

    for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "intermediate_size"):
        if not isinstance(config[key], int) or isinstance(config[key], bool) or config[key] <= 0:
            raise ValueError(f"{key}: {config[key]!r} is not a positive integer")
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
