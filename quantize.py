"""
GPTQ post-training quantization of a checkpoint folder (the algorithm itself: gptq.py), plus round-to-nearest
(RTN) as the baseline and GPTQModel (the maintained AutoGPTQ) as the reference implementation.

    python quantize.py --model out/pretrain --data data/x_val.bin --out out/gptq --bits 4 --group_size 128

Calibration windows from a token file go through the model block by block; every nn.Linear of the decoder
blocks becomes a gptq.QuantLinear. The output folder is the AutoGPTQ / GPTQModel checkpoint layout that
GPTQModel and transformers load, and its config.json gets a "quantization_config" so that
Transformer.from_pretrained loads it back. Perplexity before and after, time and size are printed.
"""
import argparse
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn

import cli
from checkpoint import atomic_dir, model_folder, read_config, write_json
from gptq import BITS, QuantLinear, dequantize_weight, quantize_weight, relative_error, set_module
from model import Transformer
from scoring import perplexity
from tokenizer import tokenizer_hashes
from tokens import check_token_file, load_token_file


# ----------------------------------------------------------------------------- the whole model, block by block

class _StopForward(Exception):
    pass


def capture_block_inputs(model, batches):
    """(args, kwargs) of the first decoder block for every calibration batch: the embeddings plus whatever the
    model passes its blocks (RoPE cos/sin, mask, ...), caught by a pre-hook that stops the forward there."""
    inputs = []

    def catch(module, args, kwargs):
        inputs.append((args, kwargs))
        raise _StopForward

    handle = model.layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for batch in batches:
            try:
                model(batch)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return inputs


def run_block(block, args, kwargs):
    out = block(*args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def sequential_stages(block, args, kwargs):
    """The block's Linear layers in call order, grouped by the input they share: [q, k, v], [o], [gate, up],
    [down] for Llama. Each group is quantized on inputs that went through the already quantized groups before
    it ("true sequential", as GPTQModel does by default)."""
    order = []
    hooks = [m.register_forward_pre_hook(lambda m, a, name=name: order.append((name, a[0])))
             for name, m in block.named_modules() if isinstance(m, nn.Linear)]
    run_block(block, args, kwargs)
    for h in hooks:
        h.remove()
    stages = []
    for name, x in order:
        if stages and stages[-1][1] is x:
            stages[-1][0].append(name)
        else:
            stages.append(([name], x))
    return [names for names, _ in stages]


@torch.no_grad()
def quantize_model(model, calib, bits=4, group_size=128, sym=True, desc_act=False, method="gptq",
                   percdamp=0.01, batch_size=8, checkpoint_format="gptq"):
    """Replace every nn.Linear of the decoder blocks by a QuantLinear, block after block, in place.
    calib: (n, T) token windows. Each block sees the outputs of the blocks before it *after* their
    quantization, so later layers correct for the error of earlier ones. RTN runs the same loop (to measure
    its error on the same inputs) but ignores H. Returns {layer name: relative output error}."""
    inputs = capture_block_inputs(model, calib.split(batch_size))
    block_names = {id(m): n for n, m in model.named_modules()}
    errors = {}
    for block in cli.progress(model.layers, desc=f"{method} blocks"):
        prefix = block_names[id(block)]
        quantized = {}
        for names in sequential_stages(block, *inputs[0]):
            # H = 2/n sum_x x x^T over every token of every calibration window, gathered by a forward hook; the
            # layers of a stage share their input, so one H serves them all
            linears = {n: block.get_submodule(n) for n in names}
            first = linears[names[0]]
            H = torch.zeros(first.in_features, first.in_features, device=first.weight.device)
            count = 0

            def accumulate(m, a, out):
                nonlocal H, count
                x = a[0].reshape(-1, a[0].shape[-1]).float()
                H += x.t() @ x
                count += x.shape[0]

            hook = first.register_forward_hook(accumulate)
            for args, kwargs in inputs:
                run_block(block, args, kwargs)
            hook.remove()
            H *= 2 / count
            for n, m in linears.items():
                q, scales, zeros, g_idx = quantize_weight(m.weight, H if method == "gptq" else None, bits,
                                                          group_size, sym, desc_act, percdamp)
                dq = dequantize_weight(q, scales, zeros, g_idx)
                errors[f"{prefix}.{n}"] = relative_error(m.weight, dq, H)
                quantized[n] = QuantLinear.from_quantized(q, scales, zeros, g_idx, m.bias, bits, group_size,
                                                          checkpoint_format)
                # until the block is done the Linear keeps the dequantized weight: what QuantLinear computes,
                # without unpacking the integers again in every forward of the later stages
                m.weight.data = dq.to(m.weight.dtype)
        # the next block's inputs: this block's outputs with its weights quantized
        inputs = [((run_block(block, args, kwargs),) + tuple(args[1:]), kwargs) for args, kwargs in inputs]
        for n, layer in quantized.items():
            set_module(block, n, layer)
    return errors


def quantization_config(bits, group_size, sym, desc_act, method, percdamp, checkpoint_format="gptq"):
    """The config.json entry GPTQModel / transformers read (same keys as GPTQModel 7.6.0 writes)."""
    return {"quant_method": "gptq", "method": "gptq", "bits": bits, "group_size": group_size, "desc_act": desc_act,
            "sym": sym, "lm_head": False, "format": checkpoint_format, "checkpoint_format": checkpoint_format,
            "pack_dtype": "int32",
            "meta": {"quantizer": [f"quantize.py:{method}"], "damp_percent": percdamp, "static_groups": False,
                     "true_sequential": True}}


def save_quantized(model, folder, qconfig, tokenizer_path=None):
    """A checkpoint folder (config.json + model.safetensors + tokenizer) with float tensors in fp16, as GPTQ
    checkpoints are; written to a temp folder and renamed to `folder`, which must be absent or empty."""
    def write(tmp):
        model.to(torch.float16).save_pretrained(tmp, tokenizer_path=tokenizer_path)
        config = read_config(tmp)
        config["quantization_config"] = qconfig
        write_json(config, os.path.join(tmp, "config.json"))

    atomic_dir(folder, write)


def load_gptqmodel(src, bits, group_size, sym, desc_act, percdamp, device, dtype):
    """Our HF-shaped folder opened by GPTQModel (the maintained successor of AutoGPTQ), ready to quantize."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 1))
    try:
        from gptqmodel import GPTQModel, QuantizeConfig
    except ImportError:
        raise SystemExit("--backend gptqmodel: pip install gptqmodel==7.6.0") from None
    qc = QuantizeConfig(bits=bits, group_size=group_size, sym=sym, desc_act=desc_act, damp_percent=percdamp,
                        act_group_aware=False, true_sequential=True)
    return GPTQModel.load(src, qc, device=device, dtype=dtype)


def quantize_gptqmodel(model, out, calib, batch_size):
    """The same job as quantize_model + save_quantized, through GPTQModel."""
    rows = calib.tolist()
    model.quantize([{"input_ids": r, "attention_mask": [1] * len(r)} for r in rows], batch_size=batch_size)
    atomic_dir(out, model.save)


# ----------------------------------------------------------------------------- CLI

def calibration_windows(tokens, nsamples, seqlen, seed=0) -> torch.Tensor:
    """nsamples windows of seqlen tokens at random offsets of a token file (the GPTQ paper's C4 recipe)."""
    if len(tokens) <= seqlen:
        raise SystemExit(f"--data: {len(tokens)} tokens, fewer than one --seqlen {seqlen} window")
    starts = np.random.default_rng(seed).integers(0, len(tokens) - seqlen, size=nsamples)
    return torch.from_numpy(np.stack([np.asarray(tokens[s:s + seqlen], dtype=np.int64) for s in starts]))


def folder_size_mb(folder):
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors")) / 2 ** 20


def eval_ppl(folder, tokens, seqlen, device, dtype, batch_size):
    model = Transformer.from_pretrained(folder, dtype=dtype).to(device).eval()
    with torch.no_grad():
        nll, n = perplexity(model, tokens, seqlen, batch_size=batch_size, device=device)
    return math.exp(nll / n)


def check_out(out, model):
    """--out is a new folder: quantize never deletes or replaces what is already there (it may be the model)."""
    if os.path.realpath(out) == os.path.realpath(model):
        raise SystemExit(f"--out {out}: is the --model folder; quantized weights go to a new folder")
    if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)):
        raise SystemExit(f"--out {out}: exists and is not empty; give a new folder (nothing there is replaced)")


def get_args(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--model", help="checkpoint folder to quantize (ours, a step_N/ or a HF Llama / GPT-NeoX one; "
                   "default: the pretrained model of the newest `bash run.sh`, out/latest.json)")
    p.add_argument("--data", help="token .bin the calibration windows are drawn from (default: the newest "
                   "`bash run.sh`'s training tokens)")
    p.add_argument("--eval_data", default=None, help="token .bin for perplexity before/after (default: --data; "
                   "without --data the newest `bash run.sh`'s held-out tokens)")
    p.add_argument("--out", default="out/gptq", help="output checkpoint folder")
    p.add_argument("--bits", type=int, default=4, choices=BITS, help="bits per weight")
    p.add_argument("--group_size", type=int, default=128, help="input columns sharing one scale/zero (-1: whole row)")
    cli.add_flag(p, "--desc_act", False, "act-order: quantize columns by decreasing H[i, i]")
    cli.add_flag(p, "--sym", True, "symmetric grid (zero = 2^(bits-1)); --sym False: asymmetric")
    p.add_argument("--no-sym", dest="sym", action="store_false", default=argparse.SUPPRESS,
                   help="the same as --sym False")  # SUPPRESS: --sym alone owns the default (shown once)
    p.add_argument("--method", choices=["gptq", "rtn"], default="gptq", help="GPTQ or round-to-nearest")
    p.add_argument("--backend", choices=["ours", "gptqmodel"], default="ours", help="this file or the GPTQModel library")
    p.add_argument("--nsamples", type=cli.positive_int, default=128, help="calibration windows")
    p.add_argument("--seqlen", type=cli.positive_int, default=None, help="tokens per window (default: the model's max_seq_len, at most 2048)")
    p.add_argument("--percdamp", type=cli.nonneg_float, default=0.01, help="dampening: H += percdamp * mean(diag H) * I")
    p.add_argument("--batch_size", type=cli.positive_int, default=8, help="windows per forward")
    p.add_argument("--eval_tokens", type=cli.positive_int, default=65536, help="tokens scored for perplexity (the file's last ones)")
    p.add_argument("--device", default=cli.default_device(), help="cpu | cuda")
    p.add_argument("--dtype", default=None, choices=list(cli.DTYPES),
                   help="activation dtype while quantizing and evaluating; unset: bfloat16 on cuda, else float32")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration window offsets")
    args = p.parse_args(argv)
    args.model = model_folder(args.model or cli.pipeline_path("pretrain", "--model"))
    if args.data is None:  # the newest `bash run.sh`'s tokens: calibrate on its training file, score its held-out one
        args.data = cli.pipeline_path("train_data", "--data")
        args.eval_data = args.eval_data or cli.pipeline_path("val_data", "--eval_data", required=False)
    check_out(args.out, args.model)
    if args.group_size != -1 and (args.group_size < 32 or args.group_size % 32):
        raise SystemExit(f"--group_size: {args.group_size} is not -1 or a multiple of 32")
    if args.method == "rtn" and args.backend == "gptqmodel":
        raise SystemExit("--method rtn: only with --backend ours")
    if args.nsamples < 1:
        raise SystemExit("--nsamples: must be >= 1")
    args.dtype = cli.torch_dtype(args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    return args


def run(args):
    """Quantize as the flags say, print the results as `name: value` lines; returns them as a dict."""
    model = Transformer.from_pretrained(args.model, dtype=args.dtype).to(args.device).eval()
    tokens, meta = load_token_file(args.data)
    hashes = tokenizer_hashes(args.model)  # calibration tokens must be the model's tokenizer's, not just its size
    check_token_file(meta, model.args.vocab_size, hashes, path=args.data)
    eval_tokens, eval_meta = load_token_file(args.eval_data or args.data)
    check_token_file(eval_meta, model.args.vocab_size, hashes, path=args.eval_data or args.data)
    eval_tokens = eval_tokens[-args.eval_tokens:]
    seqlen = args.seqlen or min(model.args.max_seq_len, 2048)
    calib = calibration_windows(tokens, args.nsamples, seqlen, args.seed)
    res = {"ppl_fp": eval_ppl(args.model, eval_tokens, seqlen, args.device, args.dtype, args.batch_size)}
    if args.backend == "gptqmodel":  # it loads its own copy; reading the weights is not timed, as for ours
        del model
        model = load_gptqmodel(args.model, args.bits, args.group_size, args.sym, args.desc_act, args.percdamp,
                               args.device, args.dtype)

    t0 = time.time()
    if args.backend == "ours":
        # GPTQModel refuses sym=False in the v1 format unless it wrote the file itself (old AutoGPTQ files were
        # broken there), so asymmetric checkpoints use v2, which stores the zero points as they are
        fmt = "gptq" if args.sym else "gptq_v2"
        errors = quantize_model(model, calib.to(args.device), args.bits, args.group_size, args.sym, args.desc_act,
                                args.method, args.percdamp, args.batch_size, fmt)
        for name, err in errors.items():
            print(f"rel_err {name}: {err:.6f}")
        res["mean_rel_err"] = sum(errors.values()) / len(errors)
        qconfig = quantization_config(args.bits, args.group_size, args.sym, args.desc_act, args.method,
                                      args.percdamp, fmt)
        save_quantized(model, args.out, qconfig, tokenizer_path=args.model)
    else:
        quantize_gptqmodel(model, args.out, calib, args.batch_size)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    res["quantize_time_s"] = time.time() - t0
    res["ppl_quant"] = eval_ppl(args.out, eval_tokens, seqlen, args.device, args.dtype, args.batch_size)
    res["ppl_ratio"] = res["ppl_quant"] / res["ppl_fp"]
    res["size_mb_fp"], res["size_mb_quant"] = folder_size_mb(args.model), folder_size_mb(args.out)
    for k, v in res.items():
        print(f"{k}: {v:.4f}")
    return res


@cli.boundary
def main(argv=None):
    return run(get_args(argv))


if __name__ == "__main__":
    main()
