"""Timing and memory helpers shared by the benchmarks (GPU timing needs care: kernels run asynchronously)."""
import gc
import statistics
import time

import torch


def require_cuda(entry: str):
    """One-line exit for entries that only make sense on a GPU."""
    if not torch.cuda.is_available():
        raise SystemExit(f"bench.py {entry}: needs a CUDA GPU (torch.cuda.is_available() is False)")


def pick(text: str, known: list[str], flag: str) -> list[str]:
    """A comma-separated subset of `known` (an entry's --entries / --sides); anything else is a one-line exit."""
    names = text.split(",")
    if set(names) - set(known):
        raise SystemExit(f"bench.py {flag}: unknown {sorted(set(names) - set(known))} (of {known})")
    return names


def sync(device="cuda"):
    """Wait for queued GPU work, so that a wall clock read afterwards includes it (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device="cuda"):
    """Free what the previous run left and restart the peak-memory counter, so runs are compared alone."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device="cuda") -> float:
    """Largest memory held by tensors since the last reset_peak, in GiB (nan on CPU: not tracked)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if torch.device(device).type == "cuda" else float("nan")


def cuda_time_ms(fn, warmup, iters, repeats=5) -> float:
    """Milliseconds per fn() on the GPU, CUDA events around `iters` back-to-back calls (so the launch
    overhead of one call hides behind the previous kernel, as in training); median of `repeats` such runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return statistics.median(times)


def best_wall_s(fn, repeats, device="cuda") -> float:
    """Best wall time of fn() over `repeats` runs, the device drained before and after each (for calls that
    synchronise on their own inside, such as generate, where CUDA events would add nothing)."""
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def time_steps(step, warmup, steps, device="cuda", reset_peak_after_warmup=False) -> float:
    """Seconds for `steps` calls of step() after `warmup` untimed ones (compilation, allocator, autotuning).
    reset_peak_after_warmup: count peak memory of the timed steps only (warmup may hold compile buffers)."""
    for _ in range(warmup):
        step()
    sync(device)
    if reset_peak_after_warmup and torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return time.perf_counter() - t0
