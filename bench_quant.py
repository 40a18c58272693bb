"""Quantize one checkpoint with our GPTQ and with GPTQModel side by side: time, perplexity, file size.

    python bench_quant.py --model out/pretrain --data data/x_val.bin --out out/bench_quant
"""
import argparse
import os

from quantize import get_args, run


def bench_quant(args):
    """Runs quantize.run for --backend ours and gptqmodel with the same flags, prints `name: value` lines."""
    results = {}
    for backend in ("ours", "gptqmodel"):
        flags = ["--model", args.model, "--data", args.data, "--out", os.path.join(args.out, backend),
                 "--bits", str(args.bits), "--group_size", str(args.group_size), "--nsamples", str(args.nsamples),
                 "--backend", backend] + (["--desc_act"] if args.desc_act else []) + \
                (["--seqlen", str(args.seqlen)] if args.seqlen else []) + \
                (["--eval_data", args.eval_data] if args.eval_data else [])
        results[backend] = run(get_args(flags))
    for key in ("quantize_time_s", "ppl_fp", "ppl_quant", "size_mb_quant"):
        for backend, res in results.items():
            print(f"{backend} {key}: {res[key]:.4f}")
    print(f"ppl_quant ours/gptqmodel: {results['ours']['ppl_quant'] / results['gptqmodel']['ppl_quant']:.4f}")
    print(f"time ours/gptqmodel: {results['ours']['quantize_time_s'] / results['gptqmodel']['quantize_time_s']:.4f}")
    return results


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint folder to quantize")
    p.add_argument("--data", required=True, help="calibration token .bin")
    p.add_argument("--eval_data", default=None, help="token .bin for perplexity (default: --data)")
    p.add_argument("--out", required=True, help="folder for the two quantized checkpoints (ours/, gptqmodel/)")
    p.add_argument("--bits", type=int, default=4, help="bits per weight")
    p.add_argument("--group_size", type=int, default=128, help="group size (-1: per row)")
    p.add_argument("--desc_act", action="store_true", help="act-order")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=None, help="tokens per window (default: model max_seq_len, <= 2048)")
    bench_quant(p.parse_args())
