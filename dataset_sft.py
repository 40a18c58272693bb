"""Chat data for supervised fine-tuning: readers, THE chat template, token files and training datasets.

    alpaca / sharegpt / OpenAI json(l) ──to_messages──► [{"role", "content"}, ...]
        ──render_chat──► ids + loss mask ──prepare──► X.bin (tokens) + X_mask.bin (uint8) + X.json
        ──SFTDataset──► rows {"input_ids", "targets"[, "doc_ids", "position_ids"]} for model.py

The chat template (one function, also imported by eval.py's chat, so training and inference agree):

    <s> <|system|> text <|end|> <|user|> text <|end|> <|assistant|> text <|end|> ...
    mask:  0 everywhere except the assistant's text tokens and its <|end|> (1 = trained on)

A row's targets are the next token where that token is trained: targets[t] = ids[t+1] if mask[t+1]
else -100. So the FIRST reply token is trained (predicted from <|assistant|>), and the model learns to
close its reply with <|end|> (chat stops there); nothing of the prompt ever counts in the loss.

    python dataset_sft.py chatterbot --out data/chat.jsonl            # default SFT data -> sharegpt jsonl
    python dataset_sft.py prepare --data data/chat.jsonl --tokenizer tokenizer/tokenizer.model \
        --out data/sft --val_ratio 0.1                                # data/sft_{train,val}{.bin,_mask.bin,.json}
"""
import argparse
import glob
import json
import os

import numpy as np
import torch

ROLES = ("system", "user", "assistant")
# sharegpt speaker names -> our roles (the original "human"/"gpt" and the newer "user"/"assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class BadSample(ValueError):
    """A sample that cannot be trained on; the caller adds the file name and sample index."""


# ----------------------------------------------------------------------------------------------------
# readers: every format becomes messages = [{"role": "system"|"user"|"assistant", "content": str}, ...]

def _field(d: dict, key: str, where: str = ""):
    if not isinstance(d, dict):
        raise BadSample(f"{where}expected a JSON object, got {type(d).__name__}")
    if key not in d:
        raise BadSample(f"{where}missing field '{key}'")
    return d[key]


def alpaca_to_messages(sample: dict) -> list[dict]:
    """{"instruction", "input", "output", optional "system", "history": [[query, reply], ...]}."""
    messages = [{"role": "system", "content": sample["system"]}] if sample.get("system") else []
    history = sample.get("history") or []
    if not isinstance(history, list):
        raise BadSample("field 'history' must be a list of [query, reply] pairs")
    for k, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise BadSample(f"history[{k}]: expected a [query, reply] pair")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    # the instruction and its optional input form one user turn
    instruction, extra = _field(sample, "instruction"), sample.get("input") or ""
    messages.append({"role": "user", "content": f"{instruction}\n{extra}" if extra else instruction})
    messages.append({"role": "assistant", "content": _field(sample, "output")})
    return messages


def _turns_to_messages(sample: dict, list_key: str, role_key: str, content_key: str, roles: dict) -> list[dict]:
    """A list of turns under list_key, each naming its speaker (mapped through roles) and its text."""
    turns = _field(sample, list_key)
    if not isinstance(turns, list):
        raise BadSample(f"field {list_key!r} must be a list")
    messages = []
    for k, turn in enumerate(turns):
        where = f"{list_key}[{k}]: "
        speaker = _field(turn, role_key, where)
        if speaker not in roles:
            raise BadSample(f"{where}unknown role {speaker!r} (expected one of {', '.join(roles)})")
        messages.append({"role": roles[speaker], "content": _field(turn, content_key, where)})
    return messages


def sharegpt_to_messages(sample: dict) -> list[dict]:
    """{"conversations": [{"from": "system"|"human"|"gpt"|"user"|"assistant", "value": str}, ...]}."""
    return _turns_to_messages(sample, "conversations", "from", "value", SHAREGPT_ROLES)


def openai_to_messages(sample: dict) -> list[dict]:
    """{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}."""
    return _turns_to_messages(sample, "messages", "role", "content", {r: r for r in ROLES})


def check_messages(messages: list[dict]) -> list[dict]:
    """An optional system message first, then user/assistant turns alternating, ending with a non-empty reply."""
    for k, m in enumerate(messages):
        if not isinstance(m["content"], str):
            raise BadSample(f"message {k} ({m['role']}): content must be a string, got {type(m['content']).__name__}")
    first = 1 if messages and messages[0]["role"] == "system" else 0
    if len(messages) == first:
        raise BadSample("no user/assistant turns")
    for k in range(first, len(messages)):
        want = "user" if (k - first) % 2 == 0 else "assistant"
        if messages[k]["role"] != want:
            raise BadSample(f"turns out of order: message {k} is {messages[k]['role']!r}, expected {want!r}")
        if want == "assistant" and not messages[k]["content"].strip():
            raise BadSample(f"message {k}: empty assistant reply")
    if messages[-1]["role"] != "assistant":
        raise BadSample(f"turns out of order: the last message ({len(messages) - 1}) is 'user', expected an assistant reply")
    return messages


def to_messages(sample) -> list[dict]:
    """Any supported sample -> checked messages; the format is told by its fields."""
    if isinstance(sample, dict) and "conversations" in sample:
        messages = sharegpt_to_messages(sample)
    elif isinstance(sample, dict) and "messages" in sample:
        messages = openai_to_messages(sample)
    elif isinstance(sample, dict) and "instruction" in sample:
        messages = alpaca_to_messages(sample)
    else:
        got = ", ".join(map(repr, sample)) if isinstance(sample, dict) else type(sample).__name__
        raise BadSample(f"unknown sample format (fields: {got}); expected 'conversations' (sharegpt), "
                        "'messages' (OpenAI) or 'instruction'/'output' (alpaca)")
    return check_messages(messages)


def read_samples(path: str):
    """Yield (where, sample) for every record of a JSON list, JSON lines or parquet file (optionally .gz/.zst),
    streamed by data_process.py's readers; `where` names file, line and sample index for error messages."""
    from data_process import BadInput, _json_records, _jsonl_records, _open_binary, _parquet_records, input_format

    fmt = input_format(path)
    if fmt == "txt":
        raise SystemExit(f"{path}: SFT data must be .json, .jsonl or .parquet (alpaca, sharegpt or OpenAI messages)")
    with _open_binary(path) as f:
        records = {"jsonl": _jsonl_records, "json": _json_records, "parquet": _parquet_records}[fmt](path, f)
        i = 0
        try:
            for lineno, sample in records:
                if isinstance(sample, BadInput):
                    raise sample
                if isinstance(sample, str) and not sample.strip():  # a blank line in JSON lines
                    continue
                yield f"{path}:{lineno}: sample {i}", sample
                i += 1
        except BadInput as e:
            raise SystemExit(f"{e}")


# ----------------------------------------------------------------------------------------------------
# THE chat template

def _piece_ids(tokenizer, piece: str) -> list[int]:
    """One id for a special piece such as <|user|>; a tokenizer without it spells the marker as text."""
    i = tokenizer.token_id(piece)
    return [i] if i is not None else tokenizer.encode(piece)


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """messages -> (ids, mask): <s> then <|role|> content <|end|> per message; mask 1 = trained on.

    The mask is 1 on each assistant reply's content tokens and its <|end|>, 0 on <s>, on every role
    token and on all system/user tokens. add_generation_prompt appends <|assistant|> (for chat).
    Markers written inside a content stay text (Tokenizer.encode_text_batch): only this function makes turns.
    """
    end = _piece_ids(tokenizer, "<|end|>")
    contents = tokenizer.encode_text_batch([m["content"] for m in messages]) if messages else []
    ids, mask = [tokenizer.bos_id], [0]
    for m, content in zip(messages, contents):
        if m["role"] not in ROLES:
            raise ValueError(f"unknown role {m['role']!r} (expected one of {', '.join(ROLES)})")
        role = _piece_ids(tokenizer, f"<|{m['role']}|>")
        trained = int(m["role"] == "assistant")
        ids += role + content + end
        mask += [0] * len(role) + [trained] * (len(content) + len(end))
    if add_generation_prompt:
        role = _piece_ids(tokenizer, "<|assistant|>")
        ids += role
        mask += [0] * len(role)
    return ids, mask


# ----------------------------------------------------------------------------------------------------
# the default SFT data: chatterbot-corpus dialogues -> sharegpt jsonl

def chatterbot_samples(corpus_dir: str, languages: list[str], counts: dict):
    """Yield sharegpt samples from chatterbot_corpus/data/<language>/*.yml (`conversations: [[turn, ...]]`).

    Turns alternate user / assistant. A dialogue of odd length ends on a line nobody answers: that
    last line is dropped. Entries that are not a list of lines (the corpus has one) are skipped.
    """
    import yaml

    for language in languages:
        files = sorted(glob.glob(os.path.join(corpus_dir, language, "*.yml")))
        if not files:
            raise SystemExit(f"{os.path.join(corpus_dir, language)}: no *.yml files (is chatterbot-corpus installed?)")
        for path in files:
            with open(path, encoding="utf-8") as f:
                dialogues = yaml.safe_load(f).get("conversations") or []
            for dialogue in dialogues:
                counts["dialogues"] += 1
                if not isinstance(dialogue, list) or not all(isinstance(t, (str, int, float)) for t in dialogue):
                    counts["skipped_malformed"] += 1
                    continue
                turns = [str(t).strip() for t in dialogue]
                counts["dropped_unanswered_turns"] += len(turns) % 2
                turns = turns[: len(turns) // 2 * 2]
                sample = {"conversations": [{"from": ("human", "gpt")[k % 2], "value": t} for k, t in enumerate(turns)]}
                try:
                    to_messages(sample)
                except BadSample:
                    counts["skipped_malformed"] += 1
                    continue
                counts["samples"] += 1
                yield sample


def convert_chatterbot(out: str, languages: list[str], corpus_dir: str | None = None) -> dict:
    """Write the chatterbot dialogues of `languages` to `out` as sharegpt jsonl; return the counts."""
    if corpus_dir is None:
        try:
            import chatterbot_corpus
        except ImportError:
            raise SystemExit("chatterbot-corpus is not installed: pip install chatterbot-corpus")
        corpus_dir = os.path.join(os.path.dirname(chatterbot_corpus.__file__), "data")
    counts = dict(dialogues=0, samples=0, dropped_unanswered_turns=0, skipped_malformed=0)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".tmp", "w", encoding="utf-8") as f:
        for sample in chatterbot_samples(corpus_dir, languages, counts):
            f.write(json.dumps(sample, ensure_ascii=False) + "\n")
    os.replace(out + ".tmp", out)
    return counts


# ----------------------------------------------------------------------------------------------------
# training datasets

def fit_turns(mask: np.ndarray, budget: int) -> int:
    """Length of the longest prefix made of whole turns that fits in `budget` tokens (0: not even one reply).

    A turn ends with its reply's <|end|>: the last token of each run of 1s in the mask.
    """
    turn_ends = np.flatnonzero((mask == 1) & (np.append(mask[1:], 0) == 0)) + 1
    fits = turn_ends[turn_ends <= budget]
    return int(fits[-1]) if len(fits) else 0


class SFTDataset(torch.utils.data.IterableDataset):
    """Rows of max_seq_len tokens from an SFT token file, one epoch per `iter()`; resumable.

    mode="padding": one sample per row, right-padded (causal attention never looks at the pads).
    mode="packing": whole samples spliced into rows; each row also carries doc_ids (which sample a
        token belongs to: model.py attends only within equal doc_ids = reset_mask) and position_ids
        restarting at 0 in each sample (= reset_position_ids), so a packed sample computes exactly
        what it computes alone in a padded row.
    A sample keeps its trailing EOS, so model.doc_ids_from_eos(input_ids) gives the same doc_ids
    (when pad_id != eos_id, as with our tokenizer; the pads then form one last document).
    A sample longer than a row keeps its whole turns from the start; one whose first reply does not
    fit is dropped (counts in .stats). Each epoch is a fresh seeded shuffle; rank r of world_size
    takes rows r, r + world_size, ... (the same number on every rank). state_dict() is the position.
    Use it in the training process itself (DataLoader num_workers=0): rows are cheap memmap slices,
    and the position must be counted where the rows are consumed.
    """

    def __init__(self, path: str, max_seq_len: int, mode: str = "packing", shuffle: bool = True, seed: int = 1337,
                 rank: int = 0, world_size: int = 1, vocab_size: int | None = None, tokenizer_hash: str | None = None):
        from data_process import check_token_file, load_token_file

        if mode not in ("padding", "packing"):
            raise ValueError(f"mode must be 'padding' or 'packing', got {mode!r}")
        self.ids, meta = load_token_file(path)
        if vocab_size is not None:
            check_token_file(meta, vocab_size, tokenizer_hash, path=path)
        if "mask" not in meta.get("arrays", {}):
            raise SystemExit(f"{path}: no loss mask; SFT token files are written by dataset_sft.py prepare")
        self.mask, _ = load_token_file(path, array="mask")
        self.eos_id, self.pad_id = meta["eos_id"], meta.get("pad_id", meta["eos_id"])
        self.max_seq_len, self.mode, self.shuffle, self.seed = max_seq_len, mode, shuffle, seed
        self.rank, self.world_size = rank, world_size

        if len(self.ids) and self.ids[-1] != self.eos_id:
            raise SystemExit(f"{path}: does not end with EOS (id {self.eos_id}); not an SFT token file of dataset_sft.py")
        # samples end at EOS; each keeps n tokens before its EOS, so it takes n + 1 places in a row
        ends = np.flatnonzero(self.ids == self.eos_id)
        self.starts = np.concatenate([[0], ends + 1])[:-1].astype(np.int64)
        self.lens = ends - self.starts
        overlong = np.flatnonzero(self.lens + 1 > max_seq_len)
        for i in overlong:
            self.lens[i] = fit_turns(np.asarray(self.mask[self.starts[i]: ends[i]]), max_seq_len - 1)
        self.kept = np.flatnonzero(self.lens > 0)
        self.stats = {"samples": len(ends), "truncated": int((self.lens[overlong] > 0).sum()),
                      "dropped": len(ends) - len(self.kept)}
        self.epoch, self.rows_seen = 0, 0  # rows_seen: rows of this epoch taken by all ranks together
        self._rows_cache = {}  # epoch -> rows, for the last two epochs (a batch may straddle an epoch boundary)

    def epoch_rows(self, epoch: int) -> list[np.ndarray]:
        """This rank's rows for `epoch`, each an array of sample indices."""
        if epoch in self._rows_cache:
            return self._rows_cache[epoch]
        order = self.kept
        if self.shuffle:
            order = order[np.random.default_rng([self.seed, epoch]).permutation(len(order))]
        if self.mode == "padding":
            rows = [order[k: k + 1] for k in range(len(order))]
        else:  # greedy: fill a row with samples in order until the next one does not fit
            rows, row, used = [], [], 0
            for i in order:
                if used + self.lens[i] + 1 > self.max_seq_len:
                    rows.append(np.array(row))
                    row, used = [], 0
                row.append(i)
                used += self.lens[i] + 1
            if row:
                rows.append(np.array(row))
        # every rank gets the same number of rows, or the ranks' step counts (and all-reduces) diverge
        n = len(rows) // self.world_size * self.world_size
        self._rows_cache = {e: r for e, r in self._rows_cache.items() if e == epoch - 1}
        self._rows_cache[epoch] = rows[self.rank: n: self.world_size]
        return self._rows_cache[epoch]

    def __len__(self):
        """Rows this rank yields in the current epoch."""
        return len(self.epoch_rows(self.epoch))

    def make_row(self, samples) -> dict:
        """Splice samples (indices) into one row of max_seq_len tokens with next-token targets."""
        T = self.max_seq_len
        input_ids = np.full(T, self.pad_id, dtype=np.int64)
        targets = np.full(T, -100, dtype=np.int64)
        doc_ids = np.zeros(T, dtype=np.int64)
        position_ids = np.zeros(T, dtype=np.int64)
        t = 0
        for d, i in enumerate(samples):
            s, n = self.starts[i], self.lens[i]
            ids, mask = self.ids[s: s + n].astype(np.int64), self.mask[s: s + n]
            input_ids[t: t + n], input_ids[t + n] = ids, self.eos_id
            # targets[t] = ids[t+1] if mask[t+1]: the reply's first token is predicted from <|assistant|>,
            # and nothing crosses into the next sample (this sample's last target predicts its EOS: -100)
            targets[t: t + n - 1] = np.where(mask[1:] == 1, ids[1:], -100)
            doc_ids[t: t + n + 1] = d
            position_ids[t: t + n + 1] = np.arange(n + 1)
            t += n + 1
        # the pads form one more "document" of their own, as doc_ids_from_eos sees them
        doc_ids[t:], position_ids[t:] = len(samples), np.arange(T - t)
        row = {"input_ids": torch.from_numpy(input_ids), "targets": torch.from_numpy(targets)}
        if self.mode == "packing":
            row.update(doc_ids=torch.from_numpy(doc_ids), position_ids=torch.from_numpy(position_ids))
        return row

    def __iter__(self):
        if torch.utils.data.get_worker_info() is not None:
            raise RuntimeError("SFTDataset counts its position where rows are consumed: use DataLoader(num_workers=0)")
        rows = self.epoch_rows(self.epoch)
        for k in range(self.rows_seen // self.world_size, len(rows)):
            self.rows_seen = (k + 1) * self.world_size
            yield self.make_row(rows[k])
        self.epoch, self.rows_seen = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "rows_seen": self.rows_seen, "seed": self.seed, "mode": self.mode,
                "max_seq_len": self.max_seq_len}

    def load_state_dict(self, state: dict):
        for key in ("seed", "mode", "max_seq_len"):
            if state[key] != getattr(self, key):
                raise SystemExit(f"cannot resume SFT data: checkpoint has {key}={state[key]!r}, this run {getattr(self, key)!r}")
        # rows_seen counts rows of all ranks, so a resume with another world_size starts at the same place
        self.epoch, self.rows_seen = state["epoch"], state["rows_seen"]


# ----------------------------------------------------------------------------------------------------
# preprocessing: SFT json(l) -> OUT_{train,val}.bin + _mask.bin + .json

def render_chunk(task):
    """Worker: (conversations, dtype) -> (flat ids, flat mask, tokens per sample); every sample is
    followed by EOS with mask 0, the document separator of all token files."""
    from data_process import worker_tokenizer

    conversations, dtype = task
    tok = worker_tokenizer()
    ids, mask, per_sample = [], [], []
    for messages in conversations:
        sample_ids, sample_mask = render_chat(tok, messages)
        ids += sample_ids + [tok.eos_id]
        mask += sample_mask + [0]
        per_sample.append(len(sample_ids) + 1)
    return np.array(ids, dtype), np.array(mask, np.uint8), np.array(per_sample, np.int64)


def prepare(files, tokenizer_path, out, val_ratio=0.0, workers=1, skip_bad_samples=False, chunk_samples=1024,
            progress=True) -> dict:
    """Normalise, check and render every sample; write OUT_train (+ OUT_val) token, mask and meta files."""
    import collections

    from tqdm import tqdm

    from data_process import TokenFileWriter, imap_ordered, init_worker, is_val_doc, token_dtype
    from tokenizer import Tokenizer

    if not 0 <= val_ratio < 1:
        raise SystemExit(f"--val_ratio {val_ratio}: must be in [0, 1)")
    tok = Tokenizer(tokenizer_path)
    dt = token_dtype(tok.vocab_size)
    counts = collections.Counter()
    meta = dict(vocab_size=tok.vocab_size, tokenizer=os.path.abspath(tok.path), tokenizer_hash=tok.file_hash,
                eos_id=tok.eos_id, bos_id=tok.bos_id, pad_id=tok.pad_id, sources=[os.path.abspath(p) for p in files],
                # which pieces the template found in this tokenizer (None: spelled as text)
                chat_tokens={p: tok.token_id(p) for p in ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")})

    def conversations():
        for path in files:
            for where, sample in read_samples(path):
                counts["samples_read"] += 1
                try:
                    yield to_messages(sample)
                except BadSample as e:
                    if not skip_bad_samples:
                        raise SystemExit(f"{where}: {e} (or pass --skip_bad_samples)")
                    counts["bad_samples"] += 1

    def tasks():
        chunk = []
        for messages in conversations():
            chunk.append(messages)
            if len(chunk) == chunk_samples:
                yield chunk, dt
                chunk = []
        if chunk:
            yield chunk, dt

    splits = ["train"] + (["val"] if val_ratio > 0 else [])
    writers = {s: TokenFileWriter(f"{out}_{s}", dt, {**meta, "split": s}, extra={"mask": np.uint8}) for s in splits}
    n_samples = 0
    try:
        with tqdm(unit="sample", desc="render", disable=not progress) as bar:
            for ids, mask, per_sample in imap_ordered(render_chunk, tasks(), workers, init_worker, (tok.path,)):
                is_val = np.array([is_val_doc(n_samples + i, val_ratio) for i in range(len(per_sample))], bool)
                n_samples += len(per_sample)
                token_is_val = np.repeat(is_val, per_sample)  # spread the per-sample choice over its tokens
                for split, sel in (("train", ~token_is_val), ("val", token_is_val)):
                    if split in writers:
                        writers[split].write(ids[sel], n_docs=int(np.count_nonzero(is_val == (split == "val"))),
                                             mask=mask[sel])
                        counts[f"{split}_trained_tokens"] += int(mask[sel].sum())
                bar.update(len(per_sample))
        if n_samples == 0:
            raise SystemExit(f"{', '.join(files)}: no usable samples (counts: {dict(counts)})")
        for w in writers.values():
            w.meta["counts"] = dict(counts)
            w.commit()
    except BaseException:
        for w in writers.values():
            if not w.done:
                w.abort()
        raise
    return {"samples_read": counts["samples_read"], "bad_samples": counts["bad_samples"],
            **{f"{s}_samples": w.n_docs for s, w in writers.items()},
            **{f"{s}_tokens": w.n_tokens for s, w in writers.items()},
            **{f"{s}_trained_tokens": counts[f"{s}_trained_tokens"] for s in writers},
            **{f"{s}_file": w.prefix + ".bin" for s, w in writers.items()}}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("chatterbot", help="convert the chatterbot-corpus dialogues (the default SFT data) to sharegpt jsonl",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    c.add_argument("--out", required=True, help="output .jsonl file (sharegpt: {\"conversations\": [{from, value}]})")
    c.add_argument("--languages", nargs="+", default=["chinese", "english"],
                   help="chatterbot_corpus/data/<language> folders to convert")
    c.add_argument("--corpus_dir", default=None, help="the corpus data folder (default: the installed chatterbot_corpus/data)")
    r = sub.add_parser("prepare", help="render SFT json/jsonl/parquet to OUT_{train,val}.bin + _mask.bin + .json",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    r.add_argument("--data", nargs="+", required=True,
                   help="SFT files: alpaca (instruction/input/output[/system/history]), sharegpt (conversations) "
                        "or OpenAI (messages); .json list, .jsonl or .parquet, optionally .gz/.zst")
    r.add_argument("--tokenizer", required=True, help="tokenizer .model / tokenizer.json / folder holding one")
    r.add_argument("--out", required=True, help="output prefix: writes OUT_train.bin, OUT_train_mask.bin, OUT_train.json (+ OUT_val.*)")
    r.add_argument("--val_ratio", type=float, default=0.0, help="fraction of samples for OUT_val, evenly spread (0: no val files)")
    r.add_argument("--workers", type=int, default=max(1, os.cpu_count() or 1), help="tokenizer worker processes")
    r.add_argument("--skip_bad_samples", action="store_true",
                   help="skip samples with a missing field, unknown role, turns out of order or an empty reply, "
                        "and report their count, instead of stopping at the first")
    r.add_argument("--chunk_samples", type=int, default=1024, help="samples per worker task")
    r.add_argument("--max_seq_len", type=int, default=None,
                   help="also report how many samples a training row of this length would truncate or drop")
    args = p.parse_args()
    if args.command == "chatterbot":
        stats = convert_chatterbot(args.out, args.languages, args.corpus_dir)
        stats["file"] = args.out
    else:
        stats = prepare(args.data, args.tokenizer, args.out, args.val_ratio, args.workers, args.skip_bad_samples,
                        args.chunk_samples)
        for split in ("train", "val") if args.max_seq_len else ():
            if f"{split}_file" in stats:
                fit = SFTDataset(stats[f"{split}_file"], args.max_seq_len, shuffle=False).stats
                stats.update({f"{split}_truncated": fit["truncated"], f"{split}_dropped": fit["dropped"]})
    for k, v in stats.items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
