"""bench.py's entries, one module each, all with the same two functions:

    add_args(parser)   the entry's flags
    run(args)          measures, prints `name: value` lines (ours beside the Hugging Face / reference alternative)

Shared timing and memory helpers live in common.py. The modules import the flat stage scripts (model.py,
trainer.py, ...) from the repo root, which bench.py puts on sys.path.
"""
NAMES = ["attn", "train", "decode", "finetune", "quant", "data", "scaling"]
