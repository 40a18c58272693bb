"""Token files, the format every training stage reads (DESIGN.md, "Token files" and "SFT files").

X.bin is a flat array of token ids, uint16 when the vocabulary fits (< 65536 pieces), else uint32, with EOS
after every document; X.json records dtype, vocab_size, tokenizer_hash, eos_id, n_tokens, n_docs and what
the writing stage adds. Parallel arrays of the same length sit beside it (X_mask.bin: uint8, 1 = trained on).

    with TokenFileWriter("data/sft_train", np.uint16, meta, extra={"mask": np.uint8}) as w:
        w.write(tokens, n_docs=1, mask=mask)
    ids, meta = load_token_file("data/sft_train.bin")
    check_token_file(meta, tokenizer.vocab_size, tokenizer.file_hash)   # refuse another tokenizer's file
"""
import hashlib
import json
import os

import numpy as np

from cli import read_json_object
from tokenizer import tokenizer_hashes


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
        self.sha256 = hashlib.sha256()  # of PREFIX.bin: names this file in a train + val pair (commit_together)
        self.done = False

    def write(self, tokens, n_docs: int = 0, **arrays):
        tokens = np.asarray(tokens)
        if set(arrays) != set(self.extra):
            raise ValueError(f"write() needs exactly the arrays {sorted(self.extra)}, got {sorted(arrays)}")
        if tokens.dtype != self.dtype and len(tokens) and (tokens.max() > np.iinfo(self.dtype).max or tokens.min() < 0):
            raise ValueError(f"token ids outside {self.dtype.name}: {tokens.min()}..{tokens.max()}")
        data = tokens.astype(self.dtype, copy=False).tobytes()
        self.files[None].write(data)
        self.sha256.update(data)
        for name, a in arrays.items():
            a = np.asarray(a)
            if len(a) != len(tokens):
                raise ValueError(f"array {name!r} has {len(a)} entries for {len(tokens)} tokens")
            self.files[name].write(a.astype(self.extra[name], copy=False).tobytes())
        self.n_tokens += len(tokens)
        self.n_docs += n_docs

    def finish(self, **more) -> dict:
        """Close the files and write the meta (plus `more`) to PREFIX.json.tmp; publish() puts them in place."""
        for f in self.files.values():
            f.close()
        meta = {**self.meta, **more, "dtype": self.dtype.name, "n_tokens": self.n_tokens, "n_docs": self.n_docs}
        if self.extra:
            meta["arrays"] = {name: {"file": os.path.basename(self.paths[name]), "dtype": dt.name}
                              for name, dt in self.extra.items()}
        with open(self.prefix + ".json.tmp", "w", encoding="utf-8") as f:
            json.dump(meta, f, ensure_ascii=False, indent=2)
        return meta

    def unpublish(self):
        """Remove the .json of an earlier run: a .json says its .bin files are complete, so it goes first."""
        if os.path.exists(self.prefix + ".json"):
            os.remove(self.prefix + ".json")

    def publish(self):
        """The .bin files into place, then the .json last."""
        for p in self.paths.values():
            os.replace(p + ".tmp", p)
        os.replace(self.prefix + ".json.tmp", self.prefix + ".json")
        self.done = True

    def commit(self) -> dict:
        meta = self.finish()
        self.unpublish()
        self.publish()
        return meta

    def abort(self):
        for name, f in self.files.items():
            f.close()
        for p in [*self.paths.values(), self.prefix + ".json"]:
            if os.path.exists(p + ".tmp"):
                os.remove(p + ".tmp")
        self.done = True

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if not self.done:
            self.abort() if exc_type is not None else self.commit()


def commit_together(writers: dict):
    """Commit the writers of one run ({"train": w, "val": w}) as one unit. Each meta records the pair, the
    sha256 of every split's .bin ({"train": ..., "val": ...}); the old metas of all splits go first, then each
    split's files, train's last. So a reader that finds X_train.json finds the X_val.json written with it or
    none, and same_pair() tells an X_val of another run (an interrupted run, an earlier --val_ratio) apart."""
    pair = {split: w.sha256.hexdigest() for split, w in writers.items()}
    for w in writers.values():
        w.finish(pair=pair)
    for w in writers.values():
        w.unpublish()
    for split in sorted(writers, key=lambda s: s == "train"):
        writers[split].publish()


def same_pair(train_path: str, val_path: str) -> bool:
    """Whether two token files were committed together by one run (commit_together); files written before
    pairs were recorded record none and pass, as they did."""
    a, b = (read_meta(_prefix(p) + ".json") for p in (train_path, val_path))
    return a.get("pair") == b.get("pair")


def _prefix(path: str) -> str:
    for ext in (".bin", ".json"):
        if path.endswith(ext):
            return path[: -len(ext)]
    return path


TOKEN_DTYPES = ("uint16", "uint32")   # what token_dtype gives; a meta naming another dtype is not a token file
ARRAY_DTYPES = ("uint8", *TOKEN_DTYPES)  # parallel arrays (the SFT loss mask is uint8)


def read_meta(path: str) -> dict:
    """X.json of a token file, checked: JSON, an object, a token dtype, integer n_tokens and vocab_size."""
    meta = read_json_object(path, "not a token-file meta: ")
    if meta.get("dtype") not in TOKEN_DTYPES:
        raise SystemExit(f"{path}: dtype {meta.get('dtype')!r} is not a token dtype ({' or '.join(TOKEN_DTYPES)})")
    for key in ("n_tokens", "vocab_size"):
        if not isinstance(meta.get(key), int) or isinstance(meta.get(key), bool) or meta[key] < 0:
            raise SystemExit(f"{path}: {key} {meta.get(key)!r} is not a count (made by data_process.py?)")
    return meta


def load_token_file(path: str, array: str | None = None):
    """(np.memmap of ids, meta) for X.bin / X.json / X; array="mask" gives the parallel X_mask.bin instead."""
    prefix = _prefix(path)
    if not os.path.isfile(prefix + ".json"):
        what = "meta file not found" if os.path.isfile(prefix + ".bin") else "no such token file"
        raise SystemExit(f"{path}: {what} (token files are X.bin + X.json, made by data_process.py)")
    meta = read_meta(prefix + ".json")
    if array is None:
        bin_path, dtype = prefix + ".bin", np.dtype(meta["dtype"])
    else:
        arrays = meta.get("arrays") if isinstance(meta.get("arrays"), dict) else {}
        info = arrays.get(array)
        if not (isinstance(info, dict) and isinstance(info.get("file"), str) and info.get("dtype") in ARRAY_DTYPES):
            raise SystemExit(f"{prefix}.json: no parallel array {array!r} with a file and a dtype (has {sorted(arrays)})")
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


def check_token_file(meta: dict, vocab_size: int, tokenizer_hash=None, path: str = "token file"):
    """Refuse a token file made with another tokenizer than the model's (the llama2.c vocab-mismatch crash).
    tokenizer_hash: the hash of the tokenizer in use, or the set of hashes of a checkpoint folder's tokenizer
    files (tokenizer.model and tokenizer.json give the same ids); None / empty: only the vocab size is checked."""
    if meta.get("vocab_size") != vocab_size:
        raise SystemExit(f"{path}: tokenized with a vocab_size {meta.get('vocab_size')} tokenizer but the model "
                         f"has vocab_size {vocab_size}; re-run data_process.py with the model's tokenizer")
    hashes = {tokenizer_hash} if isinstance(tokenizer_hash, str) else set(tokenizer_hash or ())
    if hashes and meta.get("tokenizer_hash") not in hashes:
        raise SystemExit(f"{path}: tokenized with tokenizer {meta.get('tokenizer')} (hash {meta.get('tokenizer_hash')}) "
                         f"but this tokenizer has hash {' / '.join(sorted(hashes))}; re-run data_process.py with it")


def check_model_tokenizer(folder: str, tokenizer_hash: str, flag: str = "--init_from"):
    """Refuse to go on from a checkpoint folder trained with another tokenizer than the one in use (same vocab
    size or not: its ids mean other pieces). A folder without tokenizer files cannot be checked and passes."""
    hashes = tokenizer_hashes(folder)
    if hashes and tokenizer_hash not in hashes:
        raise SystemExit(f"{flag} {folder}: trained with tokenizer hash {' / '.join(sorted(hashes))}, but the "
                         f"tokenizer in use has hash {tokenizer_hash}; use the model's tokenizer (and data made with it)")


def is_val_doc(i, val_ratio: float):
    """Document i (an int or an array of them) goes to val when floor((i+1) r) steps up: exactly floor(n r) of
    n documents, evenly spread, the same on every run and for any worker count."""
    return np.floor((i + 1) * val_ratio) > np.floor(i * val_ratio)
