"""What every stage script's command line shares: on/off flags, the help layout and the dtype names.

Torch is imported only where a function needs it: the data stages (and their worker processes) use this
module without loading torch.

On/off flags take both spellings, `--lora` and `--lora True|False` (the seeds write `--use_deepspeed True`):

    add_flag(parser, "--lora", False, "train a LoRA adapter")
"""
import argparse

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
        if "%(default)" in help or "default" in help.lower() or action.default in (None, argparse.SUPPRESS):
            return help  # a help that already says its default, or a flag without one
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
