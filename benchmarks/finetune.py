"""Fine-tuning on one GPU, ours (fine_tuning.py) vs transformers + peft: full, LoRA r=8, long context.

At the 1.1B (TinyLlama) shape: full fine-tuning vs LoRA r=8, ours (lora.py's model on trainer.py, as
fine_tuning.py builds it) beside
transformers + peft; then long context at --long_factor x the trained length with YaRN and LoRA: plain
causal attention on sdpa (flash / cuDNN), plain eager attention (T x T scores) and LongLoRA's S2-Attn.
Peak memory and tokens/s per run (or OOM: a run that does not fit says so and the others go on), as
`name: value` lines.

    python bench.py finetune                       # every part at the 1.1B shape (GPU)
    python bench.py finetune --parts long --long_factor 4 --batch_size 2    # 4x length only
    python bench.py finetune --preset tiny --device cpu --steps 2 --warmup 1    # smoke test

Weights are random (no download): speed and memory do not depend on their values. Each run takes
--warmup steps, then times --steps optimizer steps of batch_size rows x seq_len tokens (bf16 autocast,
AdamW); SFT-like rows: the first half of each row is prompt (-100), the second half is trained on.
"""
import argparse
import itertools
import json
import os
import tempfile

import torch

import cli
import lora
import trainer
from benchmarks.common import peak_gib, require_cuda, reset_peak, time_steps
from distributed import setup_distributed
from model import ModelArgs, Transformer


class RandomSFT:
    """trainer.py's data contract with random tokens: row r of step s seeded by (s, r); prompt half masked."""

    def __init__(self, vocab_size, seq_len):
        self.vocab_size, self.seq_len = vocab_size, seq_len

    def get_batch(self, step, rows):
        ids = torch.stack([torch.randint(0, self.vocab_size, (self.seq_len + 1,),
                                         generator=torch.Generator().manual_seed(step * 100003 + r)) for r in rows])
        targets = ids[:, 1:].clone()
        targets[:, : self.seq_len // 2] = -100
        return {"input_ids": ids[:, :-1], "targets": targets}


def finetune_args(argv):
    """fine_tuning.py's model and training flags (lora.add_args, trainer.add_train_args, its defaults)."""
    p = argparse.ArgumentParser()
    lora.add_args(p)
    trainer.add_train_args(p)
    p.set_defaults(**lora.FINETUNE_DEFAULTS)
    args = p.parse_args(argv)
    lora.check_args(args)
    return args


def run_ours(a, base, name, seq_len, extra):
    """lora.build_model + trainer.Trainer.train_step: exactly what fine_tuning.py runs."""
    device = torch.device(a.device)
    reset_peak(device)
    with tempfile.TemporaryDirectory() as out:
        args = finetune_args(["--init_from", base, "--out_dir", out, "--batch_size", str(a.batch_size),
                              "--device", a.device, "--dtype", a.dtype, "--tensorboard", "False", "--lr", "1e-5",
                              "--gradient_checkpointing", str(a.gradient_checkpointing),
                              "--max_seq_len", str(seq_len), *extra])
        try:
            model, _ = lora.build_model(args, device)
            n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
            t = trainer.Trainer(args, model, RandomSFT(model.args.vocab_size, seq_len))
            dt = time_steps(t.train_step, a.warmup, a.steps, device)
            t.logger.close()
        except torch.OutOfMemoryError:  # `name_...: OOM` and on to the next run: leaving frees this run's
            return report(a, name, seq_len, None, device)  # tensors, the next reset_peak returns the memory
    print(f"{name}_trainable_params: {n_train}")
    report(a, name, seq_len, dt, device)


def report(a, name, seq_len, dt, device):
    """tokens/s and peak memory of one timed run; dt None: it ran out of GPU memory."""
    print(f"{name}_tokens_per_s: " + ("OOM" if dt is None else f"{a.steps * a.batch_size * seq_len / dt:.0f}"))
    print(f"{name}_peak_mem_gib: " + ("OOM" if dt is None else f"{peak_gib(device):.2f}"))


def run_hf(a, base, name, seq_len, lora):
    """The usual alternative: transformers' LlamaForCausalLM (sdpa) + peft get_peft_model, a plain loop."""
    from transformers import AutoModelForCausalLM
    device = torch.device(a.device)
    dtype = torch.bfloat16 if a.dtype == "bfloat16" else torch.float32
    reset_peak(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype if lora else torch.float32,
                                                     attn_implementation="sdpa").to(device)
        if a.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if lora:
            from peft import LoraConfig, get_peft_model
            model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM",
                                                     target_modules=lora.DEFAULT_TARGETS["llama"].split(",")))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
        data = RandomSFT(model.config.vocab_size, seq_len)
        amp = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

        step_index = itertools.count()  # step s draws batch s, as trainer.py does

        def step():
            batch = data.get_batch(next(step_index), range(a.batch_size))
            # HF shifts labels itself: labels[t] is the token at t, our targets[t] the token at t + 1
            labels = torch.cat([torch.full_like(batch["targets"][:, :1], -100), batch["targets"]], 1)[:, :-1]
            with amp:
                loss = model(input_ids=batch["input_ids"].to(device), labels=labels.to(device)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        dt = time_steps(step, a.warmup, a.steps, device)
    except torch.OutOfMemoryError:
        dt = None
    report(a, name, seq_len, dt, device)


def run(a):
    device = torch.device(a.device)
    if device.type == "cuda":
        require_cuda("finetune --device cuda")
    setup_distributed(argparse.Namespace(device=a.device, local_rank=-1, use_deepspeed=False))
    torch.manual_seed(0)
    margs = ModelArgs.preset(a.preset)
    T = margs.max_seq_len
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}")
    print(f"preset: {a.preset}")
    print(f"batch_size: {a.batch_size}\ntrained_seq_len: {T}\ngradient_checkpointing: {a.gradient_checkpointing}")
    with tempfile.TemporaryDirectory() as tmp:
        base = os.path.join(tmp, "base")
        model = Transformer(margs)
        print(f"model_params: {model.num_params()}")
        model.save_pretrained(base)
        del model
        lora = ["--lora", "True", "--lora_r", "8", "--lora_alpha", "16"]
        if "full" in a.parts:
            run_ours(a, base, "full_ours", T, [])
        if "lora" in a.parts:
            run_ours(a, base, "lora_r8_ours", T, lora)
        if "full" in a.parts and a.hf:
            run_hf(a, base, "full_hf", T, lora=False)
        if "lora" in a.parts and a.hf:
            run_hf(a, base, "lora_r8_hf", T, lora=True)
        if "long" not in a.parts:
            return
        # long context: long_factor x the trained length, YaRN of that factor, LoRA; three attentions side by
        # side: plain causal sdpa (flash / cuDNN, memory linear in length), plain eager (the T x T scores
        # materialized, as naive implementations do) and LongLoRA's S2-Attn (causal sdpa per group)
        f = a.long_factor
        print(f"long{f}x_seq_len: {f * T}")
        yarn = ["--rope_scaling", json.dumps({"rope_type": "yarn", "factor": f})]
        for name, extra in [("sdpa", ["--attn_impl", "sdpa"]), ("eager", ["--attn_impl", "eager"]),
                            ("s2attn", ["--s2_attn", "True"])]:
            run_ours(a, base, f"long{f}x_{name}_lora", f * T, lora + yarn + extra)


def add_args(p):
    p.add_argument("--preset", default="1.1b", help="model.py preset to fine-tune (random weights)")
    p.add_argument("--batch_size", type=int, default=4, help="rows per step")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (allocator, kernels)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="training precision")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda | cpu")
    cli.add_flag(p, "--gradient_checkpointing", False, "recompute activations in backward (both ours and HF)")
    p.add_argument("--parts", default="full,lora,long",
                   help="which runs: full fine-tuning, lora r=8, long context (YaRN, sdpa vs eager vs S2-Attn)")
    p.add_argument("--long_factor", type=int, default=2, help="long context: this many times the trained length")
    cli.add_flag(p, "--hf", True, "also run transformers + peft side by side")
    return p

