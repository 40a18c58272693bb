"""
The training loop shared by pretrain.py and fine_tuning.py: AdamW, warmup + cosine LR, gradient
accumulation, clipping, eval, logging, atomic checkpoints, exact resume and preemption signals. Where the
model runs (one process, DDP or DeepSpeed ZeRO; precision; backward, optimizer step, optimizer state) is
distributed.py's backend: the loop below calls the same few methods whichever backend it got.

A stage script only parses its own flags, builds the model and the data, and calls:

    parser = cli.parser(__doc__); add_train_args(parser); ...; args = parser.parse_args()
    dist = setup_distributed(args)                 # distributed.py, before building data: rank / world size / device
    seed_everything(args.seed)                     # same model init on every rank
    model = Transformer(...)
    train(args, model, train_data, val_data, tokenizer_path=...)

Data contract. `train_data.get_batch(step, rows)` returns a dict of (len(rows), T) LongTensors:
"input_ids", "targets" (-100 = not trained) and optionally "position_ids" / "doc_ids"; every key is
passed to the model as a keyword argument. `rows` are indices into the step's *global* batch of
G = batch_size * grad_accum * world_size rows; a batch must depend only on (step, rows). Then
- the same global batch is seen whatever the GPU count or accumulation split (1x8 == 2x4 == 8 GPUs x 1),
- the data position is just the step, so a resumed run replays exactly the batches it would have seen.
Rank r, micro-step m gets rows [(m * world + r) * B, (m * world + r + 1) * B).

Loss normalisation. The model returns a *sum* of token losses (reduction="sum"); the trainer divides by
the number of trained tokens in the whole global batch (all ranks, all micro-steps), so every trained
token weighs the same (what SFT needs: rows have different numbers of assistant tokens). For pretraining
all tokens are trained and this is the plain mean.

Checkpoints (out_dir/step_00001000/):
    model/   config.json + model.safetensors + tokenizer, a checkpoint folder (eval.py / HF load it as is)
    state/   meta.json (step, tokens seen, world size, args), rng_rank{R}.pt (python / numpy / torch / cuda
             RNG of each rank), and the backend's optimizer state: trainer.pt (optimizer, grad scaler)
             or deepspeed/ (DeepSpeed's sharded checkpoint)
Written to step_N.tmp/, marked COMPLETE and renamed; the last --keep_last are kept; --resume takes the newest
that is complete and loads, naming any it passes over (run_checkpoints.py). Without --resume an out_dir that
holds another run's checkpoints is refused. At the end the final model is also written to out_dir
itself, so out_dir is a checkpoint folder too.
A DDP run resumes exactly on any GPU count (the full optimizer state is saved, the data order depends
only on the step). A DeepSpeed run resumes on the same count from its sharded checkpoint; on another
count that checkpoint is first converted to DeepSpeed's universal form (state/deepspeed_universal/),
which re-partitions weights and Adam moments. state/meta.json holds step, tokens seen, world size, args.
SIGTERM / SIGINT: the current step finishes, a checkpoint is saved, and the process exits with
128 + signal number (143 / 130), so a job script can tell preemption from a finished run (exit 0).
"""
import functools
import json
import math
import os
import random
import resource
import signal
import sys
import time

import numpy as np
import torch
import torch.utils.checkpoint

from checkpoint import head_name, load_state_dict
from cli import add_flag, nonneg_float, nonneg_int, positive_int
from distributed import REPO, Resume, all_reduce_sum, barrier, make_backend, print0, setup_distributed, shutdown
from run_checkpoints import FORMAT, begin_save, check_out_dir, choose_checkpoint, commit, prune, read_meta

# dense bf16 peak FLOP/s per GPU, used for MFU (a substring of torch.cuda.get_device_name)
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12,
              "A10G": 125e12, "L4": 121e12, "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12}


def add_train_args(parser):
    """The flags every training script shares. Scripts change defaults with parser.set_defaults(...)."""
    g = parser.add_argument_group("training (trainer.py)")
    g.add_argument("--out_dir", default="out/pretrain", help="checkpoints, log.jsonl, tensorboard and the final model")
    g.add_argument("--max_steps", type=int, default=1000, help="optimizer steps to train for")
    g.add_argument("--batch_size", type=positive_int, default=8, help="micro-batch rows per GPU per forward")
    g.add_argument("--grad_accum", type=positive_int, default=1, help="micro-batches accumulated per optimizer step")
    g.add_argument("--lr", type=nonneg_float, default=3e-4, help="peak learning rate")
    g.add_argument("--min_lr", type=nonneg_float, default=3e-5, help="learning rate at the end of the cosine decay")
    g.add_argument("--warmup_steps", type=int, default=100, help="linear warmup steps")
    g.add_argument("--lr_decay_steps", type=int, default=None, help="step where cosine decay reaches min_lr (default max_steps)")
    g.add_argument("--weight_decay", type=float, default=0.1, help="AdamW weight decay, applied to matrices only")
    g.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--beta2", type=float, default=0.95, help="AdamW beta2")
    g.add_argument("--grad_clip", type=nonneg_float, default=1.0, help="clip the global gradient norm to this (0 = off)")
    g.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="training precision; auto = bfloat16 on a GPU that has it, float32 on CPU")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda (the local rank picks the GPU)")
    add_flag(g, "--compile", False,
             "torch.compile the model (in a single process also the backward, through compiled autograd)")
    add_flag(g, "--gradient_checkpointing", False,
             "recompute layer activations in backward (less memory, one more forward of compute)")
    g.add_argument("--seed", type=int, default=1337, help="seed for model init and data sampling")
    g.add_argument("--log_interval", type=positive_int, default=10, help="steps between log lines")
    g.add_argument("--eval_interval", type=int, default=200, help="steps between evals on the validation data (0 = only at the end)")
    g.add_argument("--eval_iters", type=nonneg_int, default=20, help="validation micro-batches per eval (a fixed set of rows)")
    g.add_argument("--save_interval", type=int, default=500, help="steps between checkpoints (0 = only at the end)")
    g.add_argument("--keep_last", type=int, default=3, help="checkpoints to keep in out_dir")
    add_flag(g, "--resume", False, "continue from the latest checkpoint in out_dir")
    g.add_argument("--max_bad_steps", type=int, default=5, help="stop after this many non-finite losses in a row")
    add_flag(g, "--use_deepspeed", False, "train with DeepSpeed (ZeRO) instead of DDP")
    g.add_argument("--deepspeed_config", default=os.path.join(REPO, "configs", "ds_zero2.json"),
                   help="DeepSpeed JSON; batch size, accumulation, clipping and precision are filled from these flags")
    g.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher (LOCAL_RANK env wins)")
    add_flag(g, "--tensorboard", True, "write TensorBoard logs to out_dir/tb (when installed)")
    add_flag(g, "--wandb", False, "also log to Weights & Biases (when installed)")
    g.add_argument("--wandb_project", default="llm", help="wandb project name")
    return parser


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- precision, optimizer, schedule

def resolve_dtype(args, device):
    if args.dtype != "auto":
        return args.dtype
    return "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"


def make_optimizer(model, args, device, offload=False):
    """AdamW with weight decay on matrices (embeddings, projections) only: decaying norms' gains and
    biases pulls them towards 0, which hurts and is not the regulariser one wants."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = device.type == "cuda" and not offload  # one kernel for all parameters; offloaded states live on CPU
    return torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), eps=1e-8, fused=fused)


def get_lr(step, args):
    """Linear warmup to lr, then cosine decay to min_lr at lr_decay_steps, flat after.
    lr(s) = min_lr + (lr - min_lr) * (1 + cos(pi * (s - warmup) / (decay - warmup))) / 2"""
    decay_steps = args.lr_decay_steps or args.max_steps
    if step < args.warmup_steps:
        return args.lr * (step + 1) / (args.warmup_steps + 1)
    if step >= decay_steps:
        return args.min_lr
    ratio = (step - args.warmup_steps) / max(1, decay_steps - args.warmup_steps)
    return args.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (args.lr - args.min_lr)


def enable_gradient_checkpointing(model):
    """Activation checkpointing: each block keeps only its input and recomputes its activations in
    backward (memory per layer ~ one (B, T, dim) tensor instead of all intermediates; one more forward:
    about 2N more FLOPs per token on top of the 6N of forward + backward)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft wrapper
    if not hasattr(base, "layers"):
        raise SystemExit("--gradient_checkpointing: the model has no `layers` to checkpoint")
    for block in base.layers:
        block.forward = functools.partial(torch.utils.checkpoint.checkpoint, block.forward, use_reentrant=False)


# ----------------------------------------------------------------------------- checkpoints

def rng_state():
    s = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state()
    return s


def set_rng_state(s):
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


def default_save_model(model, folder, tokenizer_path):
    model.save_pretrained(folder, tokenizer_path=tokenizer_path)


def default_load_model(model, folder):
    state = load_state_dict(folder)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # a tied output head is stored once, as the embedding (save_pretrained drops it like HF does)
    if getattr(model.args, "tie_word_embeddings", False):
        missing = [k for k in missing if k != head_name(model.args.arch) + ".weight"]
    if missing or unexpected:
        raise SystemExit(f"--resume: {folder} does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


# ----------------------------------------------------------------------------- logging

class Logger:
    """`name: value` lines on stdout, out_dir/log.jsonl (for plots), TensorBoard, optional wandb. Rank 0 only.
    A training line: `step: 120/2000 loss: ... tokens/s: ... elapsed: 1m05s eta: 17m02s`; eta = time per step
    so far (evals and checkpoints included) times the steps left."""

    def __init__(self, args, enabled):
        self.enabled = enabled
        self.tb = self.wandb = None
        if not enabled:
            return
        os.makedirs(args.out_dir, exist_ok=True)
        self.jsonl = open(os.path.join(args.out_dir, "log.jsonl"), "a")
        if args.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(os.path.join(args.out_dir, "tb"))
            except ImportError:
                pass
        if args.wandb:
            try:
                import wandb
                self.wandb = wandb.init(project=args.wandb_project, config=vars(args), resume="allow")
            except ImportError:
                print("wandb: not installed, skipped", flush=True)

    def log(self, step, line, **values):
        if not self.enabled:
            return
        print(line, flush=True)
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        for k, v in values.items():
            if self.tb is not None and v is not None:
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self):
        if self.enabled:
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()
            if self.wandb is not None:
                self.wandb.finish()


def duration(seconds) -> str:
    """12s, 4m05s, 2h03m: a time a person reads at a glance."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def memory_gib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak RSS, Linux reports KiB


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


class StopSignal:
    """SIGTERM (preemption) / SIGINT (Ctrl-C) only set a flag; the loop saves at the end of the step.
    A second signal gets the default behaviour (kill now)."""

    def __init__(self):
        self.signum = 0
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        self.signum = signum
        signal.signal(signum, signal.SIG_DFL)


# ----------------------------------------------------------------------------- the loop

class Trainer:
    def __init__(self, args, model, train_data, val_data=None, tokenizer_path=None,
                 save_model=default_save_model, load_model=default_load_model):
        self.args, self.train_data, self.val_data = args, train_data, val_data
        self.tokenizer_path, self.save_model_fn = tokenizer_path, save_model
        self.dist = d = setup_distributed(args)
        check_out_dir(args.out_dir, args.resume)  # before anything is written there
        self.dtype = resolve_dtype(args, d.device)
        self.raw_model = model
        seed_everything(args.seed + d.rank)  # dropout differs per rank; the weights were seeded alike before
        self.step = self.tokens_seen = self.skipped_steps = self.bad_in_a_row = 0
        self.rows_per_step = args.batch_size * args.grad_accum * d.world_size
        if args.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        model.to(d.device)
        resume = self.find_resume(load_model) if args.resume else None  # its weights are in the model now
        make_opt = functools.partial(make_optimizer, model, args, d.device)
        self.backend = make_backend(args, d, model, self.dtype, make_opt, resume)
        self.optimizer = self.backend.optimizer
        if resume:
            self.load_state(resume.folder)
        self.seq_len = None
        self.logger = Logger(args, d.is_main)
        self.stop = StopSignal()

    def find_resume(self, load_model):
        """The newest checkpoint of out_dir that is complete and loads (run_checkpoints.py), its weights read
        into the model before any backend wraps it; None (a fresh start) when out_dir holds none."""
        args = self.args
        state_file = "deepspeed" if args.use_deepspeed else "trainer.pt"
        found = choose_checkpoint(args.out_dir, state_file, lambda folder: load_model(self.raw_model, folder), print0)
        if found is None:
            print0(f"resume: no checkpoint in {args.out_dir}, starting fresh")
            return None
        return Resume(found[0], found[1]["world_size"])

    # rows of the global batch that this rank processes at micro-step m
    def rows(self, m):
        b, w, r = self.args.batch_size, self.dist.world_size, self.dist.rank
        start = (m * w + r) * b
        return range(start, start + b)

    def to_device(self, batch):
        dev = self.dist.device
        return {k: v.to(dev, non_blocking=True) for k, v in batch.items()}

    def forward(self, batch):
        with self.backend.autocast:
            return self.backend.model(**batch, reduction="sum")

    def train_step(self):
        args, d = self.args, self.dist
        lr = get_lr(self.step, args)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        batches = [self.train_data.get_batch(self.step, self.rows(m)) for m in range(args.grad_accum)]
        self.seq_len = batches[0]["input_ids"].shape[1]
        # trained tokens in the global batch, counted on the host before any GPU work
        n_local = sum(int((b["targets"] != -100).sum()) for b in batches)
        n_global = int(all_reduce_sum(torch.tensor([n_local], dtype=torch.float64, device=d.device)).item())
        # the backend averages gradients over ranks (and DeepSpeed also over micro-steps): scale the loss by
        # that divisor so the gradient is d(sum of token losses / n_global)
        # (a tensor: a python number in the backward trips torch 2.11's compiled autograd)
        scale = torch.tensor(self.backend.grad_divisor / max(n_global, 1), device=d.device)
        loss_sum = torch.zeros((), device=d.device, dtype=torch.float32)
        for m, batch in enumerate(batches):
            batch = self.to_device(batch)
            with self.backend.micro_step(last=m == args.grad_accum - 1):
                loss = self.forward(batch)
                self.backend.backward(loss * scale)
            loss_sum += loss.detach().float()
        # one all-reduce: the global loss, and whether any rank was asked to stop
        flags = torch.stack([loss_sum, torch.tensor(float(self.stop.signum > 0), device=d.device)])
        loss_sum, stop = all_reduce_sum(flags).tolist()
        loss = loss_sum / max(n_global, 1)
        grad_norm = self.optimizer_step(loss)
        self.step += 1
        self.tokens_seen += self.rows_per_step * self.seq_len
        return loss, lr, grad_norm, stop > 0

    def optimizer_step(self, loss):
        """Clip and step; a non-finite loss (or gradient) skips the update and is counted."""
        args = self.args
        ok, grad_norm = self.backend.step(math.isfinite(loss))
        if ok:
            self.bad_in_a_row = 0
            return grad_norm
        self.skipped_steps += 1
        self.bad_in_a_row += 1
        # a finite loss with a skipped update: the gradients overflowed (inf / nan norm, an fp16 loss-scale overflow)
        what = f"non-finite loss {loss}" if not math.isfinite(loss) else \
            f"gradient overflow (loss {loss:.4f}, gradient norm {grad_norm})"
        print0(f"step {self.step + 1}: {what}, update skipped ({self.bad_in_a_row} in a row)")
        if self.bad_in_a_row >= args.max_bad_steps:
            raise SystemExit(f"--max_bad_steps {args.max_bad_steps}: {self.bad_in_a_row} skipped updates (non-finite "
                             f"loss or gradients) in a row at step {self.step + 1}; lower --lr, use bfloat16, or check the data")
        return grad_norm

    @torch.no_grad()
    def evaluate(self):
        """Mean token loss over a fixed set of validation rows: rows 0..eval_iters*batch_size-1 of
        val_data's step 0, dealt out in batch_size chunks, so every launch evaluates the same tokens."""
        args, d = self.args, self.dist
        total = torch.zeros(2, device=d.device, dtype=torch.float64)
        # chunk c goes to rank c % world; every rank runs the same number of forwards (ZeRO-3 gathers
        # weights collectively), a rank past the last chunk repeats chunk 0 with weight 0
        with self.backend.evaluating():
            for i in range(math.ceil(args.eval_iters / d.world_size)):
                c = i * d.world_size + d.rank
                weight = float(c < args.eval_iters)
                c = c if c < args.eval_iters else 0
                batch = self.val_data.get_batch(0, range(c * args.batch_size, (c + 1) * args.batch_size))
                total[1] += weight * int((batch["targets"] != -100).sum())
                total[0] += weight * self.forward(self.to_device(batch)).double()
        loss_sum, n = all_reduce_sum(total).tolist()
        return loss_sum / max(n, 1)

    def save_checkpoint(self):
        args, d = self.args, self.dist
        final = os.path.join(args.out_dir, f"step_{self.step:08d}")
        tmp = final + ".tmp"
        if d.is_main:
            begin_save(final)
        barrier()
        meta = {"format": FORMAT, "step": self.step, "tokens_seen": self.tokens_seen, "skipped_steps": self.skipped_steps,
                "rows_per_step": self.rows_per_step, "world_size": d.world_size, "args": vars(args)}
        self.save_model(os.path.join(tmp, "model"))
        self.backend.save_state(os.path.join(tmp, "state"))
        if d.is_main:
            with open(os.path.join(tmp, "state", "meta.json"), "w") as f:
                json.dump(meta, f, indent=1, default=str)
        torch.save(rng_state(), os.path.join(tmp, "state", f"rng_rank{d.rank}.pt"))
        barrier()
        if d.is_main:  # every rank has written its files: the marker, then the rename, then pruning
            commit(tmp, final)
            prune(args.out_dir, args.keep_last)
            print0(f"checkpoint: {final}")
        barrier()

    def save_model(self, folder):
        """The consolidated checkpoint folder, written by rank 0 once every weight is whole on it."""
        with self.backend.full_weights():
            if self.dist.is_main:
                self.save_model_fn(self.raw_model, folder, self.tokenizer_path)

    def load_state(self, ckpt):
        d = self.dist
        state_dir, state = os.path.join(ckpt, "state"), read_meta(ckpt)
        self.backend.load_state(state_dir)
        self.step, self.tokens_seen, self.skipped_steps = state["step"], state["tokens_seen"], state["skipped_steps"]
        if state["rows_per_step"] != self.rows_per_step:
            print0(f"resume: global batch changed from {state['rows_per_step']} to {self.rows_per_step} rows; "
                   "training continues but does not replay the original data order")
        rng = os.path.join(state_dir, f"rng_rank{d.rank}.pt")
        if os.path.exists(rng):  # a rank that did not exist before keeps its fresh seed
            set_rng_state(torch.load(rng, weights_only=False))
        print0(f"resume: {ckpt} (step {self.step}, tokens {self.tokens_seen})")

    def fit(self):
        args, d = self.args, self.dist
        peak = peak_flops(d.device)
        has_mfu = hasattr(self.raw_model, "estimate_mfu")
        t0, step0 = time.time(), self.step
        start, start_step = t0, self.step  # elapsed / eta: wall time of this run, evals and checkpoints included
        stop = False
        val_loss = None
        if self.step >= args.max_steps:  # a finished run resumed, or --max_steps at or below its step
            print0(f"--max_steps {args.max_steps}: nothing to train, the run is at step {self.step}")
            self.logger.close()
            return {"step": self.step, "loss": None, "val_loss": None, "tokens_seen": self.tokens_seen,
                    "skipped_steps": self.skipped_steps, "stopped_by_signal": False}
        while self.step < args.max_steps and not stop:
            loss, lr, grad_norm, stop = self.train_step()
            last = self.step == args.max_steps or stop
            if self.step % args.log_interval == 0 or last:
                if d.device.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.time() - t0
                tok_s = (self.step - step0) * self.rows_per_step * self.seq_len / max(dt, 1e-9)
                mfu = self.raw_model.estimate_mfu(tok_s / d.world_size, peak) if peak and has_mfu else None
                mem = memory_gib(d.device)
                elapsed = time.time() - start
                eta = elapsed / max(self.step - start_step, 1) * (args.max_steps - self.step)
                line = (f"step: {self.step}/{args.max_steps} loss: {loss:.4f} lr: {lr:.3e} tokens/s: {tok_s:.0f} "
                        f"mfu: {f'{100 * mfu:.1f}%' if mfu is not None else 'n/a'} mem: {mem:.2f} GiB "
                        f"elapsed: {duration(elapsed)} eta: {duration(eta)}")
                self.logger.log(self.step, line, loss=loss, lr=lr, tokens_per_s=tok_s, mfu=mfu,
                                grad_norm=grad_norm, mem_gib=mem, tokens_seen=self.tokens_seen,
                                skipped_steps=self.skipped_steps, max_steps=args.max_steps,
                                elapsed_s=round(elapsed, 1), eta_s=round(eta, 1))
                t0, step0 = time.time(), self.step
            if self.val_data is not None and args.eval_iters > 0 and (
                    (args.eval_interval and self.step % args.eval_interval == 0) or last):
                val_loss = self.evaluate()
                ppl = math.exp(min(val_loss, 50))
                self.logger.log(self.step, f"step: {self.step} val_loss: {val_loss:.4f} val_ppl: {ppl:.2f}",
                                val_loss=val_loss, val_ppl=ppl)
                t0 = time.time()  # eval time is not training throughput
            if (args.save_interval and self.step % args.save_interval == 0) or last:
                self.save_checkpoint()
                t0 = time.time()
        if not stop:
            self.save_model(args.out_dir)  # out_dir itself is the final checkpoint folder
        self.logger.close()
        return {"step": self.step, "loss": loss, "val_loss": val_loss, "tokens_seen": self.tokens_seen,
                "skipped_steps": self.skipped_steps, "stopped_by_signal": stop}


def train(args, model, train_data, val_data=None, tokenizer_path=None,
          save_model=default_save_model, load_model=default_load_model):
    """Train `model` on `train_data` (see the module docstring for the data contract) and return a dict
    of final numbers. save_model(model, folder, tokenizer_path) / load_model(model, folder) write and
    read the weights folder (defaults: model.save_pretrained / its safetensors), e.g. a LoRA adapter.
    Exits with 128 + signum after a SIGTERM / SIGINT checkpoint."""
    trainer = Trainer(args, model, train_data, val_data, tokenizer_path, save_model, load_model)
    result = trainer.fit()
    signum = trainer.stop.signum
    shutdown()
    if result["stopped_by_signal"]:
        print0(f"stopped: signal {signum or 'on another rank'}, checkpoint saved at step {result['step']}")
        sys.exit(128 + (signum or signal.SIGTERM))
    return result
