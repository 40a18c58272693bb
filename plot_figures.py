"""Draw the README's pictures from the logs: the loss curve and the bench.py throughput table.

    python plot_figures.py loss out/gpu/pretrain/log.jsonl [more log.jsonl ...] --out figures/loss.png
    python plot_figures.py table bench_results.txt --out figures/bench.png [--match 'tokens/s|_ms$']

loss:  train loss and validation loss against the optimizer step, one colour per log.jsonl (trainer.py writes
       one per run: `{"step": s, "loss": ...}` every --log_interval steps, `{"step": s, "val_loss": ...}` at
       every evaluation). A resumed run appends to the same file; the last record of a step wins.
table: the `name: value` lines of a `bench.py --out FILE` file as a picture, and as a markdown table on stdout
       (for the README). Lines starting with `#` are skipped; a name printed again (a later run) keeps its last
       value. The `device:` line becomes the caption, so the table names the machine.

matplotlib is optional (not needed to train): without it the table is still printed as markdown.
"""
import json
import os
import re

import cli
from checkpoint import atomic_write


def read_log(path):
    """(train, val): lists of (step, value) from one trainer.py log.jsonl, sorted by step."""
    train, val = {}, {}
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    step = int(rec["step"])
                except (ValueError, KeyError, TypeError):
                    raise SystemExit(f"plot_figures.py: {path}:{n}: not a trainer.py log record: {line.strip()[:80]}")
                if rec.get("loss") is not None:
                    train[step] = float(rec["loss"])
                if rec.get("val_loss") is not None:
                    val[step] = float(rec["val_loss"])
    except FileNotFoundError:
        raise SystemExit(f"plot_figures.py: {path}: no such file")
    if not train and not val:
        raise SystemExit(f"plot_figures.py: {path}: no loss or val_loss records")
    return sorted(train.items()), sorted(val.items())


def read_bench(path):
    """{name: value} from `name: value` lines (bench.py's output), in first-seen order, last value kept."""
    rows = {}
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.startswith("#") or ": " not in line:
                    continue
                name, value = line.rstrip("\n").split(": ", 1)
                rows[name.strip()] = value.strip()
    except FileNotFoundError:
        raise SystemExit(f"plot_figures.py: {path}: no such file")
    return rows


def pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    return plt


def save(fig, out):
    """Write to a temp name in the same folder, then rename: a reader never sees half a PNG."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=150, bbox_inches="tight"), suffix=".tmp.png")
    print(f"wrote: {out}")


def plot_loss(args):
    plt = pyplot()
    if plt is None:
        raise SystemExit("plot_figures.py loss: needs matplotlib (pip install matplotlib)")
    if args.labels and len(args.labels) != len(args.logs):
        raise SystemExit(f"plot_figures.py --labels: {len(args.labels)} labels for {len(args.logs)} logs")
    labels = args.labels or [os.path.basename(os.path.dirname(os.path.abspath(p))) for p in args.logs]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (path, label) in enumerate(zip(args.logs, labels)):
        train, val = read_log(path)
        color = f"C{i}"
        if train:
            ax.plot(*zip(*train), color=color, alpha=0.8, lw=1.2, label=f"{label} train")
        if val:
            ax.plot(*zip(*val), color=color, lw=2, ls="--", marker="o", ms=3, label=f"{label} validation")
        print(f"{label}_last_train_loss: {train[-1][1]:.4f}" if train else f"{label}_last_train_loss: n/a")
        print(f"{label}_last_val_loss: {val[-1][1]:.4f}" if val else f"{label}_last_val_loss: n/a")
    if args.logy:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (nats / token)")
    ax.set_title(args.title)
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, args.out)


def markdown_table(rows, caption):
    lines = ([f"Measured on {caption}.", ""] if caption else []) + ["| name | value |", "|---|---|"]
    lines += [f"| `{k}` | {v} |" for k, v in rows.items()]
    return "\n".join(lines)


def plot_table(args):
    rows = read_bench(args.bench)
    caption = rows.pop("device", None)
    if args.match:
        try:
            pattern = re.compile(args.match)
        except re.error as e:
            raise SystemExit(f"plot_figures.py --match {args.match!r}: not a regular expression ({e})")
        rows = {k: v for k, v in rows.items() if pattern.search(k)}
    if not rows:
        raise SystemExit(f"plot_figures.py: {args.bench}: no `name: value` lines" + (" match --match" if args.match else ""))
    print(markdown_table(rows, caption))
    plt = pyplot()
    if plt is None:
        print("plot_figures.py: matplotlib is not installed (pip install matplotlib), so no PNG; markdown above")
        return
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(rows) + 0.8))
    ax.axis("off")
    table = ax.table(cellText=[[k, v] for k, v in rows.items()], colLabels=["name", "value"], loc="center",
                     cellLoc="left", colWidths=[0.72, 0.28])
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.scale(1, 1.3)
    ax.set_title(args.title + (f"\n{caption}" if caption else ""), fontsize=10)
    save(fig, args.out)


def get_parser():
    p = cli.parser(__doc__, prog="plot_figures.py")
    sub = p.add_subparsers(dest="figure", required=True)
    lo = sub.add_parser("loss", help="train and validation loss curves from trainer.py log.jsonl files")
    lo.add_argument("logs", nargs="+", help="log.jsonl files (one curve pair each)")
    lo.add_argument("--out", default="figures/loss.png", help="PNG to write (default: figures/loss.png)")
    lo.add_argument("--labels", nargs="+", default=None, help="legend name per log (default: its folder name)")
    lo.add_argument("--title", default="pretraining loss", help="figure title")
    cli.add_flag(lo, "--logy", False, "logarithmic loss axis")
    lo.set_defaults(fn=plot_loss)
    ta = sub.add_parser("table", help="the `name: value` lines of a bench.py --out file as a table")
    ta.add_argument("bench", help="file written by `python bench.py --out FILE ...`")
    ta.add_argument("--out", default="figures/bench.png", help="PNG to write (default: figures/bench.png)")
    ta.add_argument("--match", default=None, help="regular expression: keep only the names it finds (default: all)")
    ta.add_argument("--title", default="bench.py", help="figure title")
    ta.set_defaults(fn=plot_table)
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
