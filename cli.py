"""What every stage script's command line shares: on/off flags, the help layout and the dtype names.

Torch is imported only where a function needs it: the data stages (and their worker processes) use this
module without loading torch.

Paths not given on the command line come from the newest `bash run.sh` run: run.sh records what each finished
stage made in out/latest.json (`pipeline_path("pretrain", "--init_from")`).

Bad input ends a stage with one line naming the flag or file, never a traceback: range-checked argparse types
(positive_int, probability, ...), fail(what, why), check_out_dir() for output paths, and boundary() around each
stage's main() for the OSErrors of writing (a full disk).

On/off flags take both spellings, `--lora` and `--lora True|False` (the seeds write `--use_deepspeed True`):

    add_flag(parser, "--lora", False, "train a LoRA adapter")
"""
import argparse
import functools
import json
import os
import sys
import tempfile

DTYPES = ("float32", "bfloat16", "float16")  # the --dtype names; torch_dtype(name) gives the torch dtype


def str2bool(v) -> bool:
    """argparse type of an on/off flag's value: True/False (also 1/0, yes/no, on/off)."""
    if isinstance(v, bool):
        return v
    if v.lower() in ("true", "1", "yes", "y", "on"):
        return True
    if v.lower() in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {v!r}")


def add_flag(parser, name: str, default, help: str):
    """An on/off flag: `--name` alone turns it on, `--name True|False` sets it."""
    return parser.add_argument(name, type=str2bool, nargs="?", const=True, default=default,
                               metavar="True|False", help=help)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written (its examples keep their lines) and each flag's default once."""

    def _get_help_string(self, action):
        help = action.help or ""
        if "%(default)" in help or "default" in help.lower() or action.default in (None, "", argparse.SUPPRESS):
            return help  # a help that already says its default, or a flag without one ("" included)
        return super()._get_help_string(action)


def parser(description: str, **kwargs) -> argparse.ArgumentParser:
    """An ArgumentParser with HelpFormatter; `description` is usually the script's __doc__."""
    return argparse.ArgumentParser(description=description, formatter_class=HelpFormatter, **kwargs)


def torch_dtype(name: str):
    """torch.float32 / torch.bfloat16 / torch.float16 of a --dtype name."""
    import torch
    return getattr(torch, name)


def default_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


# what `bash run.sh` records in out/latest.json after each finished stage, and what a script defaults to:
#   tokenizer  train_data  val_data      (data_process.py: X_train.bin / X_val.bin)
#   sft_train  sft_val                   (dataset_sft.py prepare)
#   pretrain   sft  lora  lora_merged  gptq    (checkpoint folders)
#   model      the newest full model: the SFT one once that stage ran, else the pretrained one
LATEST = os.path.join("out", "latest.json")


def pipeline_outputs(path=LATEST) -> dict:
    """What the newest `bash run.sh` made ({} before any run): names -> paths, relative to the folder run.sh
    ran in (the repo root: the folder above out/)."""
    try:
        with open(path) as f:
            outputs = json.load(f)
    except (OSError, ValueError):
        return {}
    root = os.path.dirname(os.path.dirname(path))
    return {k: os.path.join(root, v) if isinstance(v, str) and k != "preset" else v for k, v in outputs.items()}


def pipeline_path(name: str, flag: str, required=True):
    """The path `bash run.sh` recorded under `name` for a flag left out; a one-line SystemExit naming the flag
    when there is none (required) or None."""
    path = pipeline_outputs().get(name)
    if path is None and required:
        raise SystemExit(f"{flag}: not given, and no `bash run.sh` output to default to ({LATEST} has no "
                         f"{name!r}); run `bash run.sh` first or pass {flag}")
    return path


# ----------------------------------------------------------------------------- bad input: one line, no traceback

def read_json_object(path: str, what: str = "") -> dict:
    """A JSON file that must hold an object; otherwise a one-line SystemExit naming the file. `what` starts the
    message with the file's role (e.g. "not a token-file meta: ")."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SystemExit(f"{path}: {what}not JSON ({e})")
    if not isinstance(obj, dict):
        raise SystemExit(f"{path}: {what}expected a JSON object, got {type(obj).__name__}")
    return obj


def fail(what: str, why: str):
    """Stop the stage with one line naming the flag or file the user gave and what is wrong with it."""
    raise SystemExit(f"{what}: {why}")


def number(kind, lo=None, hi=None, lo_open=False, hi_open=False):
    """argparse type: an int or float in a range, e.g. number(float, 0, 1, lo_open=True) is (0, 1]. NaN and
    infinities are refused; argparse names the flag in its error line."""
    def parse(s):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not {'an integer' if kind is int else 'a number'}")
        if v != v or v in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"{s!r} is not a finite number")
        if (lo is not None and (v < lo or (lo_open and v == lo))) or (hi is not None and (v > hi or (hi_open and v == hi))):
            left, right = "(" if lo_open else "[", ")" if hi_open or hi is None else "]"
            raise argparse.ArgumentTypeError(f"{s} is outside {left}{'-inf' if lo is None else lo}, "
                                             f"{'inf' if hi is None else hi}{right}")
        return v
    return parse


positive_int = number(int, 1)          # >= 1
nonneg_int = number(int, 0)            # >= 0
positive_float = number(float, 0, lo_open=True)
nonneg_float = number(float, 0)
probability = number(float, 0, 1, lo_open=True)  # (0, 1]
fraction = number(float, 0, 1, hi_open=True)     # [0, 1)


def check_out_dir(path: str, flag: str):
    """An output folder the stage can write, checked before any work and without creating it: not an existing
    file, under a folder (its nearest existing ancestor) that is one and takes a new file (that also catches a
    read-only file system)."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        fail(f"{flag} {path}", "is a file, not a folder")
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        fail(f"{flag} {path}", f"{parent} is a file, not a folder")
    try:
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as e:
        fail(f"{flag} {path}", f"cannot write in {parent} ({e.strerror or e})")


def check_out_prefix(prefix: str, flag: str):
    """An output prefix (data/x writes data/x_train.bin ...): its folder is an output folder."""
    check_out_dir(os.path.dirname(os.path.abspath(prefix)), flag)


def boundary(main):
    """The error boundary of a stage's main(): an OSError (a full disk, a read-only or vanished path met while
    writing) ends the stage with one line naming the file, not a traceback. Bad flags and files are refused
    before this, by the checks above and the loaders (checkpoint.py, tokens.py, tokenizer.py, corpus.py)."""
    @functools.wraps(main)
    def run(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except OSError as e:
            where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f) or "write"
            raise SystemExit(f"{where}: {e.strerror or e}") from None
    return run


class _Lines:
    """A file for tqdm that is not a terminal (a log, a pipe): each refresh becomes a line of its own instead
    of carriage-return redraws glued into one line, as `progress: ppl:  50%|...`, so that a reader of the
    `name: value` results (`ppl: 12.3`) never takes a bar for one."""

    def __init__(self, f):
        self.f = f

    def write(self, text):
        text = text.replace("\r", "").rstrip()
        if text:
            self.f.write(f"progress: {text}\n")

    def flush(self):
        self.f.flush()


def progress(iterable=None, **kwargs):
    """tqdm on stderr: a bar on a terminal; in a log (not a tty) a plain line every 30 s and at the end."""
    from tqdm import tqdm
    if not sys.stderr.isatty():
        kwargs = {"file": _Lines(sys.stderr), "mininterval": 30, "ncols": 100, **kwargs}
    return tqdm(iterable, **kwargs)
