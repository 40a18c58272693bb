"""bench.py: every speed / memory figure the README quotes, ours beside the Hugging Face (or reference) way,
measured side by side in one run. Each entry prints `name: value` lines.

    python bench.py attn       attention backends on packed rows, and the whole model vs transformers (GPU)
    python bench.py train      pretraining tokens/s, MFU, memory vs transformers' LlamaForCausalLM (GPU)
    python bench.py decode     greedy decoding tokens/s vs transformers' generate (GPU)
    python bench.py finetune   full / LoRA / long-context fine-tuning vs transformers + peft (GPU; CPU smoke)
    python bench.py quant      our GPTQ vs GPTQModel: time, perplexity, size
    python bench.py data       data_process.py throughput and memory vs raw sentencepiece (CPU)
    python bench.py scaling    DeepSpeed tokens/s on 1 GPU vs N GPUs vs N GPUs as two loopback "nodes" (GPUs)
    python bench.py all        all of the above with their defaults (--<entry>_args passes flags to one)

`--out FILE` (before the entry name) also appends the lines to FILE, which plot_figures.py draws as a table.
`python bench.py ENTRY --help` lists an entry's flags.
"""
import argparse
import datetime
import importlib
import shlex
import sys

from benchmarks import NAMES
from cli import HelpFormatter


class Tee:
    """Writes go to the terminal and to an open file, so the file gets exactly what was printed."""

    def __init__(self, stream, file):
        self.stream, self.file = stream, file

    def write(self, text):
        self.stream.write(text)
        self.file.write(text)

    def flush(self):
        self.stream.flush()
        self.file.flush()


def get_parser():
    modules = {name: importlib.import_module(f"benchmarks.{name}") for name in NAMES}
    p = argparse.ArgumentParser(prog="bench.py", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", default=None, help="also append the printed `name: value` lines to this file")
    sub = p.add_subparsers(dest="entry", required=True, metavar="{" + ",".join(NAMES + ["all"]) + "}")
    parsers = {}
    for name, module in modules.items():
        parsers[name] = sub.add_parser(name, help=module.__doc__.strip().split("\n")[0],
                                       description=module.__doc__, formatter_class=HelpFormatter)
        module.add_args(parsers[name])
        parsers[name].set_defaults(module=module)
    a = sub.add_parser("all", help="every entry in turn, each with its defaults",
                       description="Runs " + ", ".join(NAMES) + " in turn. An entry that cannot run here (no GPU, "
                                   "missing flag) prints `<entry>: skipped (<why>)` and the rest go on.",
                       formatter_class=HelpFormatter)
    a.add_argument("--skip", nargs="+", default=[], choices=NAMES, help="entries not to run")
    for name in NAMES:
        a.add_argument(f"--{name}_args", default="", help=f"flags for the {name} entry, one quoted string")
    a.set_defaults(parsers=parsers)
    return p


def run_all(args):
    """Each entry with its own flags; the exit code is 1 if any entry was skipped or failed."""
    failed = []
    for name in NAMES:
        if name in args.skip:
            continue
        print(f"# bench.py {name}", flush=True)
        try:
            entry = args.parsers[name].parse_args(shlex.split(getattr(args, f"{name}_args")))
            entry.module.run(entry)
        except SystemExit as e:  # a clean one-line refusal (or argparse's own exit, already printed)
            print(f"{name}: skipped ({e.code if isinstance(e.code, str) else 'bad flags'})", flush=True)
            failed.append(name)
    if failed:
        raise SystemExit(f"bench.py all: not run: {', '.join(failed)}")


def main(argv=None):
    args = get_parser().parse_args(argv)
    go = run_all if args.entry == "all" else args.module.run
    if args.out is None:
        go(args)
        return
    # line-buffered: a run stopped by a time limit keeps every line it printed
    with open(args.out, "a", encoding="utf-8", buffering=1) as f:
        # a comment line per run says where the lines below came from (plot_figures.py skips `#` lines)
        f.write(f"# {datetime.datetime.now().isoformat(timespec='seconds')} bench.py {shlex.join(sys.argv[1:])}\n")
        stdout, sys.stdout = sys.stdout, Tee(sys.stdout, f)
        try:
            go(args)
        finally:
            sys.stdout = stdout


if __name__ == "__main__":
    main()
