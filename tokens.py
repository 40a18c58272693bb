"""Token files, the format every training stage reads (DESIGN.md, "Token files" and "SFT files").

X.bin is a flat array of token ids, uint16 when the vocabulary fits (< 65536 pieces), else uint32, with EOS
after every document; X.json records dtype, vocab_size, tokenizer_hash, eos_id, n_tokens, n_docs and what
the writing stage adds. Parallel arrays of the same length sit beside it (X_mask.bin: uint8, 1 = trained on).

    with TokenFileWriter("data/sft_train", np.uint16, meta, extra={"mask": np.uint8}) as w:
        w.write(tokens, n_docs=1, mask=mask)
    ids, meta = load_token_file("data/sft_train.bin")
    check_token_file(meta, tokenizer.vocab_size, tokenizer.file_hash)   # refuse another tokenizer's file
"""
import json
import os

import numpy as np


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


def is_val_doc(i, val_ratio: float):
    """Document i (an int or an array of them) goes to val when floor((i+1) r) steps up: exactly floor(n r) of
    n documents, evenly spread, the same on every run and for any worker count."""
    return np.floor((i + 1) * val_ratio) > np.floor(i * val_ratio)
