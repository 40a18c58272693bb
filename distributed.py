"""
Where the trainer's model runs: the process group, and the two backends behind one seam.

    dist = setup_distributed(args)     # torchrun / deepspeed launcher / plain python: rank, world size, device
    backend = make_backend(args, dist, model, dtype, make_optimizer, resume)
    with backend.micro_step(last):     # forward and backward of one micro-batch
        backend.backward(loss * scale)
    applied, grad_norm = backend.step(loss_is_finite)
    backend.save_state(state_dir) / backend.load_state(state_dir)
    with backend.full_weights(): ...   # every weight whole on this rank (ZeRO-3 gathers them)

TorchBackend: one process, or DDP over ranks; torch AdamW, autocast (fp32 master weights, matmuls in
bf16 / fp16), GradScaler for fp16, torch.compile, the full optimizer state saved by rank 0 (state/trainer.pt),
so a run resumes on any rank count.
DeepSpeedBackend: DeepSpeed ZeRO (stage, offload and the rest from its JSON config); DeepSpeed casts the
module, clips and skips non-finite steps itself, and saves its sharded checkpoint (state/deepspeed/), which
another rank count reloads through DeepSpeed's universal form (state/deepspeed_universal/).
"""
import argparse
import contextlib
import json
import math
import os
import socket
import sys
from dataclasses import dataclass

import torch
import torch.distributed as tdist
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import atomic_dir

REPO = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------- process group

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


def pick_device(args, local_rank):
    if args.device == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    return device


def init_deepspeed(backend, device):
    if "MASTER_PORT" not in os.environ:  # plain `python pretrain.py --use_deepspeed True`
        with socket.socket() as sock:     # a one-process group on a free loopback port
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import deepspeed
    if device.type == "cpu":
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op at start-up (minutes on
        # a small machine, and again whenever the compiler setup changes); gloo is enough on CPU
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=backend)


def setup_distributed(args):
    """Read the launcher's env (torchrun and deepspeed both set RANK / WORLD_SIZE / LOCAL_RANK /
    MASTER_ADDR / MASTER_PORT), pick the device and start the process group: nccl on GPUs, gloo on CPU.
    Idempotent: stage scripts call it early, the trainer calls it again."""
    global _DIST
    if _DIST is not None:
        return _DIST
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", max(args.local_rank, 0)))
    device = pick_device(args, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 or args.use_deepspeed:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if args.use_deepspeed:
            init_deepspeed(backend, device)
        else:
            tdist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        rank, world = tdist.get_rank(), tdist.get_world_size()
    _DIST = Dist(rank, local_rank, world, device)
    return _DIST


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


def shutdown():
    """Wait for every rank, then end the process group."""
    if _DIST is not None and _DIST.distributed:
        barrier()
        tdist.destroy_process_group()


# ----------------------------------------------------------------------------- the seam

@dataclass
class Resume:
    """The checkpoint a run continues from: its folder and the rank count that wrote it. The trainer has read
    its model/ weights into the model before the backend wraps it; the backend loads the optimizer state."""
    folder: str
    world_size: int


def make_backend(args, dist, model, dtype, make_optimizer, resume=None):
    """DeepSpeedBackend with --use_deepspeed, else TorchBackend. make_optimizer(offload) builds the optimizer."""
    backend = DeepSpeedBackend if args.use_deepspeed else TorchBackend
    return backend(args, dist, model, dtype, make_optimizer, resume)


def compiled_autograd():
    """A context in which torch.compile also traces the backward as autograd runs it, the gradient accumulation
    into .grad included. Under bf16 autocast each weight's bf16 gradient is cast to fp32 and added into its fp32
    .grad: plain autograd does this in two passes over fp32 memory, a cast kernel in the compiled backward and an
    add kernel per weight after it; compiled, the two fuse into one (see docs/2026-12-06-log.md).
    The forward runs inside too, as torch asks. The entry point is private torch API (2.11 to 2.13)."""
    from torch._dynamo.compiled_autograd import _enable
    return _enable(torch.compile, dynamic=False)


class TorchBackend:
    """One process, or DDP across ranks: torch's AdamW, autocast, GradScaler (fp16), torch.compile."""

    def __init__(self, args, dist, model, dtype, make_optimizer, resume=None):
        if args.dtype == "float16" and dist.device.type != "cuda":
            raise SystemExit("--dtype float16: needs a GPU (use bfloat16 or float32 on CPU)")
        self.args, self.dist, self.raw_model = args, dist, model
        self.optimizer = make_optimizer(offload=False)
        # loss scaling keeps small fp16 grads from flushing to 0
        self.scaler = torch.amp.GradScaler("cuda") if dtype == "float16" else None
        m = torch.compile(model) if args.compile else model
        # the model's buffers (RoPE tables) are the same on every rank and never change: no broadcast per forward
        self.model = DDP(m, device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
                         broadcast_buffers=False) if dist.distributed else m
        # autocast runs matmuls in the low precision while the master weights stay fp32
        self.autocast = (torch.autocast(dist.device.type, dtype=getattr(torch, dtype)) if dtype != "float32"
                         else contextlib.nullcontext())
        # compiled autograd where nothing else hooks into the backward (DDP's all-reduce keeps the plain one)
        self.backward_ctx = compiled_autograd if args.compile and not dist.distributed else contextlib.nullcontext
        # DDP averages the gradients over ranks: the loss is scaled up by the world size to undo it
        self.grad_divisor = dist.world_size

    @contextlib.contextmanager
    def micro_step(self, last):
        """Forward and backward of one micro-batch. DDP all-reduces the gradients only on the last micro-step
        of an optimizer step and accumulates locally before."""
        sync = self.model.no_sync() if isinstance(self.model, DDP) and not last else contextlib.nullcontext()
        with sync, self.backward_ctx():
            yield

    def backward(self, loss):
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, finite):
        """Clip and step unless the loss (finite False) or the gradient norm is non-finite.
        Returns (step applied, gradient norm before clipping or None)."""
        params = [p for p in self.raw_model.parameters() if p.requires_grad]
        ok, grad_norm = finite, None
        if ok:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            if self.args.grad_clip > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.args.grad_clip))
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
        return ok, grad_norm

    @contextlib.contextmanager
    def evaluating(self):
        module = self.model.module if isinstance(self.model, DDP) else self.model
        module.eval()
        yield
        module.train()

    def full_weights(self):
        return contextlib.nullcontext()  # every rank holds every weight

    def save_state(self, state_dir):
        if self.dist.is_main:  # the optimizer state is the same on every rank
            torch.save({"optimizer": self.optimizer.state_dict(),
                        "scaler": self.scaler.state_dict() if self.scaler else None},
                       os.path.join(state_dir, "trainer.pt"))

    def load_state(self, state_dir):
        opt_state = torch.load(os.path.join(state_dir, "trainer.pt"), map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(opt_state["optimizer"])
        if self.scaler is not None and opt_state.get("scaler"):
            self.scaler.load_state_dict(opt_state["scaler"])


class DeepSpeedBackend:
    """DeepSpeed ZeRO: the engine casts the module to the training dtype, averages gradients over ranks and
    micro-steps, clips, and steps only at the accumulation boundary, skipping non-finite gradients itself."""

    def __init__(self, args, dist, model, dtype, make_optimizer, resume=None):
        import deepspeed
        self.dist, self.raw_model, self.resume = dist, model, resume
        cfg = deepspeed_config(args, dist.world_size, dtype)
        self.universal = resume is not None and resume.world_size != dist.world_size
        if self.universal:
            to_universal(os.path.join(resume.folder, "state"), dist.is_main)
            cfg["checkpoint"] = {"load_universal": True}
        zero = cfg.get("zero_optimization", {})
        self.zero_stage = zero.get("stage", 0)
        offload = zero.get("offload_optimizer", {}).get("device", "none") != "none"
        opt = make_optimizer(offload=offload)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
        if args.compile:
            self.engine.compile()
        self.model = self.engine
        self.autocast = contextlib.nullcontext()
        # DeepSpeed averages over ranks (/world) and micro-steps (/grad_accum)
        self.grad_divisor = dist.world_size * args.grad_accum

    def micro_step(self, last):
        return contextlib.nullcontext()

    def backward(self, loss):
        self.engine.backward(loss)
        self.engine.step()  # an update only at the accumulation boundary

    def step(self, finite):
        norm = self.engine.get_global_grad_norm()
        return finite and self.engine.was_step_applied(), float(norm) if norm is not None else None

    @contextlib.contextmanager
    def evaluating(self):
        self.engine.eval()
        yield
        self.engine.train()

    def full_weights(self):
        """Under ZeRO-3 each rank holds a shard of every weight: gather them (all ranks take part)."""
        if self.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed
        return deepspeed.zero.GatheredParameters(list(self.raw_model.parameters()), modifier_rank=None)

    def save_state(self, state_dir):
        self.engine.save_checkpoint(os.path.join(state_dir, "deepspeed"), tag="ds")

    def load_state(self, state_dir):
        folder = "deepspeed_universal" if self.universal else "deepspeed"
        if self.universal:
            print0(f"resume: DeepSpeed checkpoint from {self.resume.world_size} ranks, now {self.dist.world_size}: "
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

        def convert(tmp):
            conversion = argparse.Namespace(input_folder=src, output_folder=tmp,
                                            num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                            strict=True, inject_missing_state=True)
            with contextlib.redirect_stdout(sys.stderr):  # its progress lines are not ours
                ds_to_universal.main(conversion)
        atomic_dir(out, convert)
    barrier()
