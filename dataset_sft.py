"""Chat data for supervised fine-tuning: sample formats -> SFT token files.

    alpaca / sharegpt / OpenAI json(l) ──to_messages──► [{"role", "content"}, ...]
        ──tokenizer.render_chat──► ids + loss mask ──prepare──► X.bin (tokens) + X_mask.bin (uint8) + X.json
        ──sft_data.SFTDataset──► training rows for fine_tuning.py

The chat template is tokenizer.render_chat (eval.py's chat calls the same function, so training and
inference agree):

    <s> <|system|> text <|end|> <|user|> text <|end|> <|assistant|> text <|end|> ...
    mask:  0 everywhere except the assistant's text tokens and its <|end|> (1 = trained on)

Each sample is followed by EOS (mask 0), the document separator of all token files.

    python dataset_sft.py chatterbot --out data/chat.jsonl            # default SFT data -> sharegpt jsonl
    python dataset_sft.py prepare --data data/chat.jsonl --tokenizer tokenizer/tokenizer.model \
        --out data/sft --val_ratio 0.1                                # data/sft_{train,val}{.bin,_mask.bin,.json}
"""
import collections
import contextlib
import glob
import json
import os

import numpy as np

import cli
from checkpoint import atomic_write
from corpus import (BadInput, imap_ordered, init_worker, input_format, open_binary, read_errors, records,
                    worker_tokenizer)
from sft_data import SFTDataset
from tokenizer import CHAT_TOKENS, ROLES, Tokenizer, render_chat
from tokens import TokenFileWriter, commit_together, is_val_doc, token_dtype

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
    for key, value in (("instruction", instruction), ("input", extra)):  # one user turn: strings, not str(list)
        if not isinstance(value, str):
            raise BadSample(f"field {key!r} must be a string, got {type(value).__name__}")
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
        if not isinstance(speaker, str) or speaker not in roles:
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
    streamed by corpus.py's readers; `where` names file, line and sample index for error messages."""
    fmt = input_format(path)
    if fmt == "txt":
        raise SystemExit(f"{path}: SFT data must be .json, .jsonl or .parquet (alpaca, sharegpt or OpenAI messages)")
    with open_binary(path) as f:
        i = 0
        try:
            for lineno, sample in records(path, f, fmt):
                if isinstance(sample, BadInput):
                    raise sample
                if isinstance(sample, str) and not sample.strip():  # a blank line in JSON lines
                    continue
                yield f"{path}:{lineno}: sample {i}", sample
                i += 1
        except BadInput as e:
            raise SystemExit(f"{e}")
        except read_errors() as e:
            raise SystemExit(f"{path}: read error, damaged or truncated file ({e})")


def conversations(files, skip_bad_samples: bool, counts):
    """Checked messages of every sample, in order. A bad sample stops the run naming file, line and sample
    index, or with skip_bad_samples is counted and skipped."""
    for path in files:
        for where, sample in read_samples(path):
            counts["samples_read"] += 1
            try:
                yield to_messages(sample)
            except BadSample as e:
                if not skip_bad_samples:
                    raise SystemExit(f"{where}: {e} (or pass --skip_bad_samples)")
                counts["bad_samples"] += 1


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

    def write(path):
        with open(path, "w", encoding="utf-8") as f:
            for sample in chatterbot_samples(corpus_dir, languages, counts):
                f.write(json.dumps(sample, ensure_ascii=False) + "\n")

    atomic_write(out, write)
    return counts


# ----------------------------------------------------------------------------------------------------
# preprocessing: SFT json(l) -> OUT_{train,val}.bin + _mask.bin + .json

def render_chunk(task):
    """Worker: (conversations, dtype) -> (flat ids, flat mask, tokens per sample); every sample is
    followed by EOS with mask 0, the document separator of all token files."""
    conversations, dtype = task
    tok = worker_tokenizer()
    ids, mask, per_sample = [], [], []
    for messages in conversations:
        sample_ids, sample_mask = render_chat(tok, messages)
        ids += sample_ids + [tok.eos_id]
        mask += sample_mask + [0]
        per_sample.append(len(sample_ids) + 1)
    return np.array(ids, dtype), np.array(mask, np.uint8), np.array(per_sample, np.int64)


def chunks(items, n: int):
    """Lists of n items (the last one shorter)."""
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def write_splits(writers: dict, rendered, val_ratio: float, counts, progress: bool) -> int:
    """Append the rendered chunks to the train (and val) writers, choosing each sample's split with
    is_val_doc; returns the number of samples."""

    n_samples = 0
    with cli.progress(unit="sample", desc="render", disable=not progress) as bar:
        for ids, mask, per_sample in rendered:
            is_val = np.array([is_val_doc(n_samples + i, val_ratio) for i in range(len(per_sample))], bool)
            n_samples += len(per_sample)
            token_is_val = np.repeat(is_val, per_sample)  # spread the per-sample choice over its tokens
            for split, sel in (("train", ~token_is_val), ("val", token_is_val)):
                if split in writers:
                    writers[split].write(ids[sel], n_docs=int(np.count_nonzero(is_val == (split == "val"))),
                                         mask=mask[sel])
                    counts[f"{split}_trained_tokens"] += int(mask[sel].sum())
            bar.update(len(per_sample))
    return n_samples


def prepare(files, tokenizer_path, out, val_ratio=0.0, workers=1, skip_bad_samples=False, chunk_samples=1024,
            progress=True) -> dict:
    """Normalise, check and render every sample; write OUT_train (+ OUT_val) token, mask and meta files."""
    if not 0 <= val_ratio < 1:
        raise SystemExit(f"--val_ratio {val_ratio}: must be in [0, 1)")
    tok = Tokenizer(tokenizer_path)
    dt = token_dtype(tok.vocab_size)
    counts = collections.Counter()
    meta = dict(vocab_size=tok.vocab_size, tokenizer=os.path.abspath(tok.path), tokenizer_hash=tok.file_hash,
                eos_id=tok.eos_id, bos_id=tok.bos_id, pad_id=tok.pad_id, sources=[os.path.abspath(p) for p in files],
                # which pieces the template found in this tokenizer (None: spelled as text)
                chat_tokens={p: tok.token_id(p) for p in CHAT_TOKENS})
    tasks = ((chunk, dt) for chunk in chunks(conversations(files, skip_bad_samples, counts), chunk_samples))
    splits = ["train"] + (["val"] if val_ratio > 0 else [])
    with contextlib.ExitStack() as stack:  # on an error each writer removes its temp files
        writers = {s: stack.enter_context(TokenFileWriter(f"{out}_{s}", dt, {**meta, "split": s}, extra={"mask": np.uint8}))
                   for s in splits}
        rendered = imap_ordered(render_chunk, tasks, workers, init_worker, (tok.path,))
        if write_splits(writers, rendered, val_ratio, counts, progress) == 0:
            raise SystemExit(f"{', '.join(files)}: no usable samples (counts: {dict(counts)})")
        for w in writers.values():
            w.meta["counts"] = dict(counts)
        commit_together(writers)  # train + val as one unit: never a new train beside an old val
    return {"samples_read": counts["samples_read"], "bad_samples": counts["bad_samples"],
            **{f"{s}_samples": w.n_docs for s, w in writers.items()},
            **{f"{s}_tokens": w.n_tokens for s, w in writers.items()},
            **{f"{s}_trained_tokens": counts[f"{s}_trained_tokens"] for s in writers},
            **{f"{s}_file": w.prefix + ".bin" for s, w in writers.items()}}


@cli.boundary
def main(argv=None):
    p = cli.parser(__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("chatterbot", help="convert the chatterbot-corpus dialogues (the default SFT data) to sharegpt jsonl",
                       formatter_class=cli.HelpFormatter)
    c.add_argument("--out", required=True, help="output .jsonl file (sharegpt: {\"conversations\": [{from, value}]})")
    c.add_argument("--languages", nargs="+", default=["chinese", "english"],
                   help="chatterbot_corpus/data/<language> folders to convert")
    c.add_argument("--corpus_dir", default=None, help="the corpus data folder (default: the installed chatterbot_corpus/data)")
    r = sub.add_parser("prepare", help="render SFT json/jsonl/parquet to OUT_{train,val}.bin + _mask.bin + .json",
                       formatter_class=cli.HelpFormatter)
    r.add_argument("--data", nargs="+", required=True,
                   help="SFT files: alpaca (instruction/input/output[/system/history]), sharegpt (conversations) "
                        "or OpenAI (messages); .json list, .jsonl or .parquet, optionally .gz/.zst")
    r.add_argument("--tokenizer", required=True, help="tokenizer .model / tokenizer.json / folder holding one")
    r.add_argument("--out", required=True, help="output prefix: writes OUT_train.bin, OUT_train_mask.bin, OUT_train.json (+ OUT_val.*)")
    r.add_argument("--val_ratio", type=cli.fraction, default=0.0, help="fraction of samples for OUT_val, evenly spread (0: no val files)")
    r.add_argument("--workers", type=cli.positive_int, default=max(1, os.cpu_count() or 1), help="tokenizer worker processes")
    cli.add_flag(r, "--skip_bad_samples", False, "skip samples with a missing field, unknown role, turns out of order "
                 "or an empty reply, and report their count, instead of stopping at the first")
    r.add_argument("--chunk_samples", type=cli.positive_int, default=1024, help="samples per worker task")
    r.add_argument("--max_seq_len", type=cli.positive_int, default=None,
                   help="also report how many samples a training row of this length would truncate or drop")
    args = p.parse_args(argv)
    cli.check_out_prefix(args.out, "--out")
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
