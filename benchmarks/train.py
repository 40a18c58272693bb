"""
Training throughput on one GPU: our model vs transformers' LlamaForCausalLM, same shapes, batch and recipe.

    python bench.py train                       # presets 350m and 1.1b at seq 2048, baby at seq 512
    python bench.py train --configs 350m:2048:8  # preset:seq_len:batch
    python bench.py train --sides ours,ours_sdpa,ours_fp32_residual,hf_compiled
    python bench.py train --grad_accum 4         # 4 forward+backward passes per optimizer step

Both sides train the same way as pretrain.py does on a GPU: fp32 master weights, bf16 autocast,
torch.compile, fused AdamW, an optimizer step per iteration after --grad_accum forward+backward passes
over the batch (default 1; more shares the optimizer step's cost among the micro-batches, as pretraining
runs with pretrain.py --grad_accum do). Ours also compiles its backward with compiled autograd, as
pretrain.py --compile does on one GPU (distributed.compiled_autograd); transformers is compiled as its users do.
Ours uses its fused chunked head + cross-entropy (gradients computed in forward, never the fp32 logits of the
whole batch), RoPE tables, the attention `auto` picks (flash-attn-4 on Hopper when installed, else cuDNN /
flash through sdpa; the side `ours_sdpa` forces sdpa), and keeps its residual stream in bf16
(Transformer.embed_input; the side `ours_fp32_residual` leaves it in fp32 as autocast does); transformers
uses its sdpa attention and its own loss on full logits.
MFU = tokens/s * (6 N + 12 L H Q T) / peak (model.estimate_mfu, PaLM appendix B), peak from trainer.PEAK_FLOPS.
Prints `name: value` lines, e.g. `train_1.1b_seq2048_b8_ours_tokens/s: <value>`.
"""
import contextlib
import dataclasses

import torch

from benchmarks.common import peak_gib, pick, require_cuda, reset_peak, time_steps
from attention import resolve_attn_impl
from checkpoint import hf_config
from model import ModelArgs, Transformer
from distributed import compiled_autograd
from trainer import PEAK_FLOPS, peak_flops

DEFAULT_CONFIGS = "1.1b:2048:8,350m:2048:16,baby:512:32"


def time_training(model, forward_loss, batch, steps, warmup, grad_accum=1, backward_ctx=contextlib.nullcontext):
    """tokens/s and peak memory of `steps` full training iterations after `warmup` (compilation) ones. An
    iteration is `grad_accum` forward+backward passes over the batch, then one optimizer step (pretrain.py
    --grad_accum: the gradient is the mean over the micro-batches), so it trains grad_accum batches of tokens.
    Each pass runs inside `backward_ctx()` (distributed.compiled_autograd for our sides, as pretrain.py does)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    x, y = batch
    scale = torch.tensor(1.0 / grad_accum, device=x.device)  # a tensor, as in trainer.py (compiled autograd)

    def step():
        for _ in range(grad_accum):
            with backward_ctx():
                with torch.autocast(x.device.type, dtype=torch.bfloat16):
                    loss = forward_loss(x, y) * scale
                loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    dt = time_steps(step, warmup, steps, reset_peak_after_warmup=True)
    return steps * grad_accum * x.numel() / dt, peak_gib()


SIDES = ["ours", "ours_sdpa", "ours_fp32_residual", "hf_compiled"]


class FP32ResidualTransformer(Transformer):
    """ours_fp32_residual: the embedding as autocast leaves it (fp32), so the residual stream stays fp32."""

    def embed_input(self, input_ids):
        return self.drop(self.embed(input_ids))


def bench_config(preset, seq_len, batch_size, sides, args, peak):
    from transformers import LlamaConfig, LlamaForCausalLM
    margs = ModelArgs.preset(preset, max_seq_len=seq_len, attn_impl="auto")
    torch.manual_seed(0)
    x = torch.randint(0, margs.vocab_size, (batch_size, seq_len), device="cuda")
    y = torch.roll(x, -1, dims=1)
    with torch.device("meta"):  # FLOPs per trained token from the shapes alone
        flops_per_token = Transformer(margs).estimate_mfu(1.0, 1.0, seq_len=seq_len)
    results = {}
    for side in sides:
        if side.startswith("ours"):
            impl = "sdpa" if side == "ours_sdpa" else margs.attn_impl  # ours_sdpa: cuDNN where auto picks flash-attn-4
            cls = FP32ResidualTransformer if side == "ours_fp32_residual" else Transformer
            model = cls(dataclasses.replace(margs, attn_impl=impl)).cuda()
            compiled = torch.compile(model)
            forward_loss = lambda a, b: compiled(a, targets=b)
            backward_ctx = compiled_autograd
        else:
            cfg = LlamaConfig(**{k: v for k, v in hf_config(margs).items() if k not in ("architectures", "model_type")})
            model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").cuda()
            compiled = torch.compile(model)
            # HF shifts labels itself: labels = inputs gives the same next-token task on T - 1 positions
            forward_loss = lambda a, b: compiled(input_ids=a, labels=a).loss
            backward_ctx = contextlib.nullcontext  # torch.compile as transformers users run it
        results[side] = time_training(model, forward_loss, (x, y), args.steps, args.warmup, args.grad_accum,
                                      backward_ctx)
        del model, compiled
        reset_peak()
        torch._dynamo.reset()

    name = f"train_{preset}_seq{seq_len}_b{batch_size}"
    print(f"{name}_ours_attention: {resolve_attn_impl(margs.attn_impl, torch.device('cuda'))}")
    for side, (tok_s, mem) in results.items():
        print(f"{name}_{side}_tokens/s: {tok_s:.0f}")
        print(f"{name}_{side}_mfu: {100 * tok_s * flops_per_token / peak:.1f}%" if peak else f"{name}_{side}_mfu: n/a")
        print(f"{name}_{side}_mem_gib: {mem:.1f}")
    if "ours" in results and "hf_compiled" in results:
        print(f"{name}_speedup: {results['ours'][0] / results['hf_compiled'][0]:.2f}")


def parse_configs(text):
    """'350m:2048:8,baby:512:32' -> [('350m', 2048, 8), ('baby', 512, 32)]"""
    configs = []
    for item in text.split(","):
        try:
            preset, seq_len, batch = item.split(":")
            configs.append((preset, int(seq_len), int(batch)))
        except ValueError:
            raise SystemExit(f"bench.py train --configs {item}: expected preset:seq_len:batch, e.g. 350m:2048:8")
    return configs


def run(args):
    configs = parse_configs(args.configs)  # bad flags fail before any GPU work
    sides = pick(args.sides, SIDES, "train --sides")
    if args.grad_accum < 1:
        raise SystemExit(f"bench.py train --grad_accum {args.grad_accum}: must be at least 1")
    require_cuda("train")
    torch.backends.cuda.matmul.allow_tf32 = True
    device = torch.device("cuda")
    peak = peak_flops(device)
    print(f"device: {torch.cuda.get_device_name(device)}")
    print(f"peak_bf16_tflops: {peak / 1e12:.0f}" if peak else f"peak_bf16_tflops: unknown (add it to trainer.PEAK_FLOPS: {sorted(PEAK_FLOPS)})")
    print(f"torch: {torch.__version__}")
    print(f"grad_accum: {args.grad_accum}")
    for preset, seq_len, batch in configs:
        bench_config(preset, seq_len, batch, sides, args, peak)


def add_args(p):
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma-separated preset:seq_len:batch_size")
    p.add_argument("--sides", default="ours,hf_compiled",
                   help=f"comma-separated models to time, of {','.join(SIDES)} (ours_sdpa: ours with attention "
                        "through sdpa even where flash-attn-4 is installed; ours_fp32_residual: ours with the residual "
                        "stream left in fp32 by autocast instead of bf16)")
    p.add_argument("--steps", type=int, default=20, help="timed training iterations (optimizer steps) per model")
    p.add_argument("--grad_accum", type=int, default=1,
                   help="forward+backward passes over the batch per optimizer step, on every side (as "
                        "pretrain.py --grad_accum); tokens/s counts steps * grad_accum * batch * seq_len tokens")
    p.add_argument("--warmup", type=int, default=5, help="untimed iterations first (compilation, autotuning)")
    return p

