"""
The training loop shared by pretrain.py and fine_tuning.py: distributed setup (torchrun / deepspeed
launcher / plain python), DDP or DeepSpeed ZeRO, precision, AdamW, warmup + cosine LR, gradient
accumulation, clipping, eval, logging, atomic checkpoints, exact resume and preemption signals.

A stage script only parses its own flags, builds the model and the data, and calls:

    parser = argparse.ArgumentParser(); add_train_args(parser); ...; args = parser.parse_args()
    dist = setup_distributed(args)                 # before building data: rank / world size / device
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
    model/   config.json + model.safetensors + tokenizer, a DESIGN.md folder (eval.py / HF load it as is)
    state/   trainer.pt (optimizer, grad scaler, step, tokens seen, args), rng_rank{R}.pt (python /
             numpy / torch / cuda RNG of each rank), deepspeed/ (DeepSpeed's sharded checkpoint)
Written to step_N.tmp/ and renamed when complete; the last --keep_last are kept. At the end the final
model is also written to out_dir itself, so out_dir is a checkpoint folder too.
A DDP run resumes exactly on any GPU count (the full optimizer state is saved, the data order depends
only on the step). A DeepSpeed run resumes on the same count from its sharded checkpoint; on another
count that checkpoint is first converted to DeepSpeed's universal form (state/deepspeed_universal/),
which re-partitions weights and Adam moments. state/meta.json holds step, tokens seen, world size, args.
SIGTERM / SIGINT: the current step finishes, a checkpoint is saved, and the process exits with
128 + signal number (143 / 130), so a job script can tell preemption from a finished run (exit 0).
"""
import argparse
import contextlib
import functools
import json
import math
import os
import random
import resource
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as tdist
import torch.utils.checkpoint
from torch.nn.parallel import DistributedDataParallel as DDP

REPO = os.path.dirname(os.path.abspath(__file__))

# dense bf16 peak FLOP/s per GPU, used for MFU (a substring of torch.cuda.get_device_name)
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12,
              "A10G": 125e12, "L4": 121e12, "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12}


def str2bool(v):
    """argparse type for flags typed as `--use_deepspeed True` (also 1/0, yes/no)."""
    if isinstance(v, bool):
        return v
    if v.lower() in ("true", "1", "yes", "y", "on"):
        return True
    if v.lower() in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {v!r}")


def add_train_args(parser):
    """The flags every training script shares. Scripts change defaults with parser.set_defaults(...)."""
    g = parser.add_argument_group("training (trainer.py)")
    g.add_argument("--out_dir", default="out/pretrain", help="checkpoints, log.jsonl, tensorboard and the final model")
    g.add_argument("--max_steps", type=int, default=1000, help="optimizer steps to train for")
    g.add_argument("--batch_size", type=int, default=8, help="micro-batch rows per GPU per forward")
    g.add_argument("--grad_accum", type=int, default=1, help="micro-batches accumulated per optimizer step")
    g.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    g.add_argument("--min_lr", type=float, default=3e-5, help="learning rate at the end of the cosine decay")
    g.add_argument("--warmup_steps", type=int, default=100, help="linear warmup steps")
    g.add_argument("--lr_decay_steps", type=int, default=None, help="step where cosine decay reaches min_lr (default max_steps)")
    g.add_argument("--weight_decay", type=float, default=0.1, help="AdamW weight decay, applied to matrices only")
    g.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--beta2", type=float, default=0.95, help="AdamW beta2")
    g.add_argument("--grad_clip", type=float, default=1.0, help="clip the global gradient norm to this (0 = off)")
    g.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="training precision; auto = bfloat16 on a GPU that has it, float32 on CPU")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda (the local rank picks the GPU)")
    g.add_argument("--compile", type=str2bool, default=False,
                   help="torch.compile the model (in a single process also the backward, through compiled autograd)")
    g.add_argument("--gradient_checkpointing", type=str2bool, default=False,
                   help="recompute layer activations in backward (less memory, ~30%% more compute)")
    g.add_argument("--seed", type=int, default=1337, help="seed for model init and data sampling")
    g.add_argument("--log_interval", type=int, default=10, help="steps between log lines")
    g.add_argument("--eval_interval", type=int, default=200, help="steps between evals on the validation data (0 = only at the end)")
    g.add_argument("--eval_iters", type=int, default=20, help="validation micro-batches per eval (a fixed set of rows)")
    g.add_argument("--save_interval", type=int, default=500, help="steps between checkpoints (0 = only at the end)")
    g.add_argument("--keep_last", type=int, default=3, help="checkpoints to keep in out_dir")
    g.add_argument("--resume", type=str2bool, default=False, help="continue from the latest checkpoint in out_dir")
    g.add_argument("--max_bad_steps", type=int, default=5, help="stop after this many non-finite losses in a row")
    g.add_argument("--use_deepspeed", type=str2bool, default=False, help="train with DeepSpeed (ZeRO) instead of DDP")
    g.add_argument("--deepspeed_config", default=os.path.join(REPO, "configs", "ds_zero2.json"),
                   help="DeepSpeed JSON; batch size, accumulation, clipping and precision are filled from these flags")
    g.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher (LOCAL_RANK env wins)")
    g.add_argument("--tensorboard", type=str2bool, default=True, help="write TensorBoard logs to out_dir/tb (when installed)")
    g.add_argument("--wandb", type=str2bool, default=False, help="also log to Weights & Biases (when installed)")
    g.add_argument("--wandb_project", default="llm", help="wandb project name")
    return parser


# ----------------------------------------------------------------------------- distributed setup

@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1


_DIST = None


def setup_distributed(args):
    """Read the launcher's env (torchrun and deepspeed both set RANK / WORLD_SIZE / LOCAL_RANK /
    MASTER_ADDR / MASTER_PORT), pick the device and start the process group: nccl on GPUs, gloo on CPU.
    Idempotent: stage scripts call it early, train() calls it again."""
    global _DIST
    if _DIST is not None:
        return _DIST
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", max(args.local_rank, 0)))
    if args.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 or args.use_deepspeed:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if args.use_deepspeed:
            if "MASTER_PORT" not in os.environ:  # plain `python pretrain.py --use_deepspeed True`
                with socket.socket() as sock:     # a one-process group on a free loopback port
                    sock.bind(("127.0.0.1", 0))
                    port = sock.getsockname()[1]
                os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                                  MASTER_PORT=str(port))
            import deepspeed
            if device.type == "cpu":
                # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op at start-up (minutes on
                # a small machine, and again whenever the compiler setup changes); gloo is enough on CPU
                deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
            deepspeed.init_distributed(dist_backend=backend)
        else:
            tdist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        rank, world = tdist.get_rank(), tdist.get_world_size()
    _DIST = Dist(rank, local_rank, world, device)
    return _DIST


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def print0(*a, **kw):
    if _DIST is None or _DIST.is_main:
        print(*a, **kw, flush=True)


def all_reduce_sum(t):
    if _DIST is not None and _DIST.distributed:
        tdist.all_reduce(t)
    return t


def barrier():
    if _DIST is not None and _DIST.distributed:
        tdist.barrier()


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


def compiled_autograd():
    """A context in which torch.compile also traces the backward as autograd runs it, the gradient accumulation
    into .grad included. Under bf16 autocast each weight's bf16 gradient is cast to fp32 and added into its fp32
    .grad: plain autograd does this in two passes over fp32 memory, a cast kernel in the compiled backward and an
    add kernel per weight after it; compiled, the two fuse into one (1.1B on an H100: 55.5% -> 56.1% MFU, README).
    The forward runs inside too, as torch asks. The entry point is private torch API (2.11 to 2.13)."""
    from torch._dynamo.compiled_autograd import _enable
    return _enable(torch.compile, dynamic=False)


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


def deepspeed_config(args, world, dtype):
    """Load the JSON and fill everything the CLI also decides, so the two can never disagree."""
    try:
        with open(args.deepspeed_config) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"--deepspeed_config {args.deepspeed_config}: cannot read ({e})")
    for key in ("optimizer", "scheduler"):
        if key in cfg:
            raise SystemExit(f"{args.deepspeed_config}: remove the '{key}' section; the trainer owns it "
                             "(AdamW from --lr/--weight_decay/--beta1/--beta2, warmup+cosine schedule)")
    cfg["train_micro_batch_size_per_gpu"] = args.batch_size
    cfg["gradient_accumulation_steps"] = args.grad_accum
    cfg["train_batch_size"] = args.batch_size * args.grad_accum * world
    cfg["gradient_clipping"] = args.grad_clip
    cfg["bf16"] = {**cfg.get("bf16", {}), "enabled": dtype == "bfloat16"}
    cfg["fp16"] = {**cfg.get("fp16", {}), "enabled": dtype == "float16"}
    # our torch AdamW also runs on offloaded (CPU) states; DeepSpeedCPUAdam would need a C++ build
    cfg["zero_force_ds_cpu_optimizer"] = False
    cfg.setdefault("steps_per_print", 10**9)
    return cfg


def enable_gradient_checkpointing(model):
    """Activation checkpointing: each block keeps only its input and recomputes its activations in
    backward (memory per layer ~ one (B, T, dim) tensor instead of all intermediates; ~1/3 more compute)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft wrapper
    if not hasattr(base, "layers"):
        raise SystemExit("--gradient_checkpointing: the model has no `layers` to checkpoint")
    for block in base.layers:
        block.forward = functools.partial(torch.utils.checkpoint.checkpoint, block.forward, use_reentrant=False)


# ----------------------------------------------------------------------------- checkpoints

def checkpoint_dirs(out_dir):
    """Complete checkpoints (renamed from .tmp), oldest first."""
    if not os.path.isdir(out_dir):
        return []
    names = sorted(n for n in os.listdir(out_dir) if n.startswith("step_") and not n.endswith(".tmp"))
    return [os.path.join(out_dir, n) for n in names]


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
    from model import load_state_dict
    state = load_state_dict(folder)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # a tied output head is stored once, as the embedding (save_pretrained drops it like HF does)
    if getattr(model.args, "tie_word_embeddings", False):
        missing = [k for k in missing if k not in ("lm_head.weight", "embed_out.weight")]
    if missing or unexpected:
        raise SystemExit(f"--resume: {folder} does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


# ----------------------------------------------------------------------------- logging

class Logger:
    """`name: value` lines on stdout, out_dir/log.jsonl (for plots), TensorBoard, optional wandb. Rank 0 only."""

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


def read_meta(ckpt) -> dict:
    """A checkpoint's state/meta.json: step, tokens seen, skipped steps, rows per step, world size, args."""
    with open(os.path.join(ckpt, "state", "meta.json")) as f:
        return json.load(f)


def to_universal(state_dir, main: bool):
    """DeepSpeed's ZeRO checkpoint holds each rank's slice of the flattened fp32 weights and Adam moments,
    so it reloads only on the rank count that wrote it. Its "universal" form stores every parameter's
    weight and moments whole (state/deepspeed_universal/), which any rank count can slice again.
    Rank 0 converts once (to a temp name, then renamed); the other ranks wait."""
    src, out = os.path.join(state_dir, "deepspeed", "ds"), os.path.join(state_dir, "deepspeed_universal", "ds")
    if not os.path.isdir(src):
        raise SystemExit(f"--resume: {state_dir}/deepspeed holds no DeepSpeed checkpoint")
    if main and not os.path.isdir(out):
        from deepspeed.checkpoint import ds_to_universal
        tmp = out + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        conversion = argparse.Namespace(input_folder=src, output_folder=tmp,
                                        num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                        strict=True, inject_missing_state=True)
        with contextlib.redirect_stdout(sys.stderr):  # its progress lines are not ours
            ds_to_universal.main(conversion)
        os.replace(tmp, out)
    barrier()


# ----------------------------------------------------------------------------- the loop

class Trainer:
    def __init__(self, args, model, train_data, val_data=None, tokenizer_path=None,
                 save_model=default_save_model, load_model=default_load_model):
        self.args, self.train_data, self.val_data = args, train_data, val_data
        self.tokenizer_path, self.save_model_fn = tokenizer_path, save_model
        self.dist = d = setup_distributed(args)
        self.dtype = resolve_dtype(args, d.device)
        if args.dtype == "float16" and d.device.type != "cuda" and not args.use_deepspeed:
            raise SystemExit("--dtype float16: needs a GPU (use bfloat16 or float32 on CPU)")
        self.raw_model = model
        seed_everything(args.seed + d.rank)  # dropout differs per rank; the weights were seeded alike before
        self.step = self.tokens_seen = self.skipped_steps = 0
        self.rows_per_step = args.batch_size * args.grad_accum * d.world_size
        if args.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        model.to(d.device)

        ckpt = checkpoint_dirs(args.out_dir)[-1] if args.resume and checkpoint_dirs(args.out_dir) else None
        if args.resume and ckpt is None:
            print0(f"resume: no checkpoint in {args.out_dir}, starting fresh")
        self.scaler = None
        if args.use_deepspeed:
            import deepspeed
            cfg = deepspeed_config(args, d.world_size, self.dtype)
            self.universal = ckpt is not None and read_meta(ckpt)["world_size"] != d.world_size
            if self.universal:
                to_universal(os.path.join(ckpt, "state"), d.is_main)
                cfg["checkpoint"] = {"load_universal": True}
            zero = cfg.get("zero_optimization", {})
            self.zero_stage = zero.get("stage", 0)
            offload = zero.get("offload_optimizer", {}).get("device", "none") != "none"
            opt = make_optimizer(model, args, d.device, offload=offload)
            self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
            if args.compile:
                self.engine.compile()
            self.model = self.engine
        else:
            self.engine = None
            if ckpt:  # weights before wrapping; optimizer state after it is built
                load_model(model, os.path.join(ckpt, "model"))
            self.optimizer = make_optimizer(model, args, d.device)
            if self.dtype == "float16":
                self.scaler = torch.amp.GradScaler("cuda")  # loss scaling keeps small fp16 grads from flushing to 0
            m = torch.compile(model) if args.compile else model
            # the model's buffers (RoPE tables) are the same on every rank and never change: no broadcast per forward
            self.model = DDP(m, device_ids=[d.device.index] if d.device.type == "cuda" else None,
                             broadcast_buffers=False) if d.distributed else m
        if ckpt:
            self.load_state(ckpt)
        # autocast runs matmuls in the low precision while the master weights stay fp32 (DDP path;
        # DeepSpeed casts the module itself)
        use_amp = self.engine is None and self.dtype != "float32"
        self.autocast = (torch.autocast(d.device.type, dtype=getattr(torch, self.dtype)) if use_amp
                         else contextlib.nullcontext())
        # compiled autograd where nothing else hooks into the backward: DDP's gradient all-reduce and DeepSpeed's
        # engine keep the plain one
        self.backward_ctx = (compiled_autograd if args.compile and self.engine is None and not d.distributed
                             else contextlib.nullcontext)
        self.seq_len = None
        self.logger = Logger(args, d.is_main)
        self.stop = StopSignal()

    # rows of the global batch that this rank processes at micro-step m
    def rows(self, m):
        b, w, r = self.args.batch_size, self.dist.world_size, self.dist.rank
        start = (m * w + r) * b
        return range(start, start + b)

    def to_device(self, batch):
        dev = self.dist.device
        return {k: v.to(dev, non_blocking=True) for k, v in batch.items()}

    def forward(self, batch):
        with self.autocast:
            return self.model(**batch, reduction="sum")

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
        # DDP and DeepSpeed average gradients over ranks (/world), DeepSpeed also over micro-steps
        # (/grad_accum); scale so the gradient is d(sum of token losses / n_global)
        # (a tensor: a python number in the backward trips torch 2.11's compiled autograd)
        scale = torch.tensor(d.world_size * (args.grad_accum if self.engine else 1) / max(n_global, 1),
                             device=d.device)
        loss_sum = torch.zeros((), device=d.device, dtype=torch.float32)
        for m, batch in enumerate(batches):
            last = m == args.grad_accum - 1
            batch = self.to_device(batch)
            # DDP: all-reduce the gradients only on the last micro-step, accumulate locally before
            sync = self.model.no_sync() if isinstance(self.model, DDP) and not last else contextlib.nullcontext()
            with sync, self.backward_ctx():
                loss = self.forward(batch)
                if self.engine is not None:
                    self.engine.backward(loss * scale)
                    self.engine.step()  # DeepSpeed updates only at the accumulation boundary
                elif self.scaler is not None:
                    self.scaler.scale(loss * scale).backward()
                else:
                    (loss * scale).backward()
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
        if self.engine is not None:  # DeepSpeed stepped already; it skips non-finite gradients itself
            norm = self.engine.get_global_grad_norm()
            ok = math.isfinite(loss) and self.engine.was_step_applied()
            grad_norm = float(norm) if norm is not None else None
        else:
            params = [p for p in self.raw_model.parameters() if p.requires_grad]
            ok = math.isfinite(loss)
            grad_norm = None
            if ok:
                if self.scaler is not None:
                    self.scaler.unscale_(self.optimizer)
                if args.grad_clip > 0:
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, args.grad_clip))
                else:
                    grad_norm = float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
                if self.scaler is not None:
                    self.scaler.step(self.optimizer)  # skips by itself on inf grads (a loss-scale overflow)
                    self.scaler.update()
                elif math.isfinite(grad_norm):
                    self.optimizer.step()
                else:
                    ok = False
            self.optimizer.zero_grad(set_to_none=True)
        if ok:
            self.bad_in_a_row = 0
        else:
            self.skipped_steps += 1
            self.bad_in_a_row = getattr(self, "bad_in_a_row", 0) + 1
            print0(f"step {self.step + 1}: non-finite loss {loss}, update skipped ({self.bad_in_a_row} in a row)")
            if self.bad_in_a_row >= args.max_bad_steps:
                raise SystemExit(f"--max_bad_steps {args.max_bad_steps}: {self.bad_in_a_row} non-finite losses in a "
                                 f"row at step {self.step + 1}; lower --lr, use bfloat16, or check the data")
        return grad_norm

    @torch.no_grad()
    def evaluate(self):
        """Mean token loss over a fixed set of validation rows: rows 0..eval_iters*batch_size-1 of
        val_data's step 0, dealt out in batch_size chunks, so every launch evaluates the same tokens."""
        args, d = self.args, self.dist
        model = self.model.module if isinstance(self.model, DDP) else self.model
        model.eval()
        total = torch.zeros(2, device=d.device, dtype=torch.float64)
        # chunk c goes to rank c % world; every rank runs the same number of forwards (ZeRO-3 gathers
        # weights collectively), a rank past the last chunk repeats chunk 0 with weight 0
        for i in range(math.ceil(args.eval_iters / d.world_size)):
            c = i * d.world_size + d.rank
            weight = float(c < args.eval_iters)
            c = c if c < args.eval_iters else 0
            batch = self.val_data.get_batch(0, range(c * args.batch_size, (c + 1) * args.batch_size))
            total[1] += weight * int((batch["targets"] != -100).sum())
            total[0] += weight * self.forward(self.to_device(batch)).double()
        model.train()
        loss_sum, n = all_reduce_sum(total).tolist()
        return loss_sum / max(n, 1)

    def save_checkpoint(self):
        args, d = self.args, self.dist
        final = os.path.join(args.out_dir, f"step_{self.step:08d}")
        tmp = final + ".tmp"
        if d.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(final, ignore_errors=True)
            os.makedirs(os.path.join(tmp, "state"))
        barrier()
        meta = {"step": self.step, "tokens_seen": self.tokens_seen, "skipped_steps": self.skipped_steps,
                "rows_per_step": self.rows_per_step, "world_size": d.world_size, "args": vars(args)}
        self.save_model(os.path.join(tmp, "model"))
        if self.engine is not None:
            self.engine.save_checkpoint(os.path.join(tmp, "state", "deepspeed"), tag="ds")
        elif d.is_main:
            torch.save({"optimizer": self.optimizer.state_dict(),
                        "scaler": self.scaler.state_dict() if self.scaler else None},
                       os.path.join(tmp, "state", "trainer.pt"))
        if d.is_main:
            with open(os.path.join(tmp, "state", "meta.json"), "w") as f:
                json.dump(meta, f, indent=1, default=str)
        torch.save(rng_state(), os.path.join(tmp, "state", f"rng_rank{d.rank}.pt"))
        barrier()
        if d.is_main:
            os.replace(tmp, final)  # a checkpoint exists only once complete
            for old in checkpoint_dirs(args.out_dir)[:-args.keep_last] if args.keep_last > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
            print0(f"checkpoint: {final}")
        barrier()

    def save_model(self, folder):
        """The consolidated DESIGN.md folder. Under ZeRO-3 each rank holds a shard of every weight:
        gather them (all ranks take part), then rank 0 writes."""
        if self.engine is not None and self.zero_stage == 3:
            import deepspeed
            with deepspeed.zero.GatheredParameters(list(self.raw_model.parameters()), modifier_rank=None):
                if self.dist.is_main:
                    self.save_model_fn(self.raw_model, folder, self.tokenizer_path)
        elif self.dist.is_main:
            self.save_model_fn(self.raw_model, folder, self.tokenizer_path)

    def load_state(self, ckpt):
        d = self.dist
        state_dir, state = os.path.join(ckpt, "state"), read_meta(ckpt)
        if self.engine is not None:
            folder = "deepspeed_universal" if self.universal else "deepspeed"
            if self.universal:
                print0(f"resume: DeepSpeed checkpoint from {state['world_size']} ranks, now {d.world_size}: "
                       "re-partitioned from its universal form")
            # ZeRO-3's universal loader copies the first param group's settings onto every group, which would
            # put weight decay on the norms: the groups keep their own (the schedule sets lr every step)
            decay = [g["weight_decay"] for g in self.optimizer.param_groups]
            path, _ = self.engine.load_checkpoint(os.path.join(state_dir, folder), tag="ds",
                                                  load_lr_scheduler_states=False)
            for g, wd in zip(self.optimizer.param_groups, decay):
                g["weight_decay"] = wd
            if path is None:
                raise SystemExit(f"--resume: {state_dir}/{folder} holds no DeepSpeed checkpoint")
        else:
            opt_state = torch.load(os.path.join(state_dir, "trainer.pt"), map_location="cpu", weights_only=False)
            self.optimizer.load_state_dict(opt_state["optimizer"])
            if self.scaler is not None and opt_state.get("scaler"):
                self.scaler.load_state_dict(opt_state["scaler"])
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
        stop = False
        val_loss = None
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
                line = (f"step: {self.step} loss: {loss:.4f} lr: {lr:.3e} tokens/s: {tok_s:.0f} "
                        f"mfu: {f'{100 * mfu:.1f}%' if mfu is not None else 'n/a'} mem: {mem:.2f} GiB")
                self.logger.log(self.step, line, loss=loss, lr=lr, tokens_per_s=tok_s, mfu=mfu,
                                grad_norm=grad_norm, mem_gib=mem, tokens_seen=self.tokens_seen,
                                skipped_steps=self.skipped_steps)
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
    if _DIST is not None and _DIST.distributed:
        barrier()
        tdist.destroy_process_group()
    if result["stopped_by_signal"]:
        print0(f"stopped: signal {signum or 'on another rank'}, checkpoint saved at step {result['step']}")
        sys.exit(128 + (signum or signal.SIGTERM))
    return result
