"""One small tokenizer wrapper used by every stage.

Accepts a sentencepiece `.model` (what train_tokenizer.py writes), a Hugging Face `tokenizer.json`
(e.g. GPT-NeoX 20B's byte-level BPE), or a folder holding either (a `tokenizer.model` is preferred,
so a folder that holds both reads the same ids as sentencepiece).

    tok = Tokenizer("tokenizer/tokenizer.model")
    ids = tok.encode("你好", bos=True, eos=True)
    tok.decode(ids), tok.vocab_size, tok.eos_id, tok.token_id("<|user|>"), tok.file_hash

and THE chat template (render_chat), which SFT data, eval and chat all call, so training and inference
can never disagree:

    <s> <|system|> text <|end|> <|user|> text <|end|> <|assistant|> text <|end|> ...
    mask:  0 everywhere except the assistant's text tokens and its <|end|> (1 = trained on)
"""
import hashlib
import os
import re

from cli import read_json_object

# ids of special pieces when a HF tokenizer.json does not say which is which: the first
# name found in the vocabulary wins (Llama/sentencepiece names first, then GPT-NeoX / Llama-3 names)
_EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|endoftext|>")
_PAD_NAMES = ("<pad>", "<|padding|>", "[PAD]")

# the chat-role pieces: <|system|> <|user|> <|assistant|> open a turn, <|end|> closes it
ROLES = ("system", "user", "assistant")
ROLE_TOKENS = {role: f"<|{role}|>" for role in ROLES}
END_TOKEN = "<|end|>"
CHAT_TOKENS = [*ROLE_TOKENS.values(), END_TOKEN]  # train_tokenizer.py gives each one id
# a chat-role piece typed inside a text (the group keeps it in re.split's output)
_CHAT_MARKER = re.compile("(" + "|".join(map(re.escape, CHAT_TOKENS)) + ")")


TOKENIZER_NAMES = ("tokenizer.model", "tokenizer.json")  # in a folder: the one a Tokenizer reads first


def file_sha256(path: str, n_hex: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:n_hex]


def resolve_tokenizer_file(path: str) -> str:
    """A tokenizer file, or the tokenizer file inside a folder (tokenizer.model before tokenizer.json)."""
    if os.path.isdir(path):
        for name in TOKENIZER_NAMES:
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        models = sorted(f for f in os.listdir(path) if f.endswith(".model"))
        if models:
            return os.path.join(path, models[0])
        raise SystemExit(f"{path}: no tokenizer.model, tokenizer.json or *.model in this folder")
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: tokenizer file not found")
    return path


def tokenizer_hashes(folder: str) -> set[str]:
    """Hashes of the tokenizer files (tokenizer.model, tokenizer.json) of a checkpoint folder: what a token file's
    meta must name to be read by its model."""
    files = [os.path.join(folder, name) for name in TOKENIZER_NAMES]
    return {file_sha256(f) for f in files if os.path.isfile(f)}


class Tokenizer:
    def __init__(self, path: str):
        self.path = resolve_tokenizer_file(path)
        self.file_hash = file_sha256(self.path)
        kind = "tokenizer.json (Hugging Face tokenizers)" if self.path.endswith(".json") else "sentencepiece model"
        try:
            self._init_hf(self.path) if self.path.endswith(".json") else self._init_sentencepiece(self.path)
        except Exception as e:  # sentencepiece and tokenizers raise RuntimeError, OSError, their own types
            why = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise SystemExit(f"{self.path}: not a valid {kind} ({why})") from None

    def _init_sentencepiece(self, path):
        import sentencepiece as spm

        # num_threads=1: batch encodes stay on one core; data_process.py parallelises with processes
        self.sp = spm.SentencePieceProcessor(model_file=path, num_threads=1)
        self.hf = None
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        # a model trained without a pad piece reports -1; padding then reuses EOS (never trained on)
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id

    def _init_hf(self, path):
        from tokenizers import Tokenizer as HFTokenizer

        self.sp = None
        self.hf = HFTokenizer.from_file(path)
        # special tokens written in a text ("</s>", "<|endoftext|>") are text, as sentencepiece reads them (and
        # transformers with split_special_tokens=True): only code that means them adds their ids (bos=, eos=)
        self.hf.encode_special_tokens = True
        self.vocab_size = self.hf.get_vocab_size(with_added_tokens=True)
        named = self._hf_special_tokens(os.path.dirname(path))

        def find(key, names):
            for name in ([named[key]] if named.get(key) else []) + list(names):
                if self.hf.token_to_id(name) is not None:
                    return self.hf.token_to_id(name)
            return None

        self.eos_id = find("eos_token", _EOS_NAMES)
        if self.eos_id is None:
            raise SystemExit(f"{path}: no end-of-text token found (looked for {', '.join(_EOS_NAMES)})")
        # GPT-NeoX uses <|endoftext|> for both begin and end of text
        self.bos_id = find("bos_token", _BOS_NAMES)
        self.bos_id = self.eos_id if self.bos_id is None else self.bos_id
        self.pad_id = find("pad_token", _PAD_NAMES)
        self.pad_id = self.eos_id if self.pad_id is None else self.pad_id

    @staticmethod
    def _hf_special_tokens(folder) -> dict:
        """bos/eos/pad names from tokenizer_config.json / special_tokens_map.json next to tokenizer.json."""
        named = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            p = os.path.join(folder, name)
            if os.path.isfile(p):
                cfg = read_json_object(p)
                for key in ("bos_token", "eos_token", "pad_token"):
                    v = cfg.get(key)
                    v = v.get("content") if isinstance(v, dict) else v
                    if isinstance(v, str) and key not in named:
                        named[key] = v
        return named

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        if self.sp is not None:
            ids = self.sp.encode(text)
        else:
            ids = self.hf.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts in one call (one C++ call, no Python loop per text)."""
        if self.sp is not None:
            return self.sp.encode(texts)
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def encode_text_batch(self, texts: list[str]) -> list[list[int]]:
        """encode_batch for data text (documents, chat messages), where chat-role pieces must not appear:
        the tokenizer matches "<|user|>" anywhere, so a text holding "<|end|><|assistant|>" would forge a
        turn. Each such marker is cut into "<|" and "end|>", encoded apart, and spells the same text with
        ordinary tokens; only render_chat puts the real role tokens in."""
        pieces = []  # per text: the strings to encode one by one
        for text in texts:
            parts = _CHAT_MARKER.split(text) if "<|" in text else [text]  # text, marker, text, ..., text
            pieces.append([p for i, part in enumerate(parts) for p in ((part[:2], part[2:]) if i % 2 else (part,))
                           if p])
        if all(len(ps) == 1 for ps in pieces):  # the common case: one call, nothing to regroup
            return self.encode_batch(texts)
        flat = iter(self.encode_batch([p for ps in pieces for p in ps]))
        return [[t for _ in ps for t in next(flat)] for ps in pieces]

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.sp is not None:
            return self.sp.decode(ids)
        return self.hf.decode(ids, skip_special_tokens=False)

    def token_id(self, piece: str) -> int | None:
        """Id of a whole piece such as "<|user|>", None when the vocabulary lacks it."""
        if self.sp is not None:
            i = self.sp.piece_to_id(piece)
            # sentencepiece maps unknown pieces to unk; only unk itself may legitimately return it
            return i if (i != self.sp.unk_id() or piece == self.sp.id_to_piece(i)) else None
        return self.hf.token_to_id(piece)

    def __repr__(self):
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, pad={self.pad_id})"


# ----------------------------------------------------------------------------------------------------
# THE chat template

def piece_ids(tokenizer: Tokenizer, piece: str) -> list[int]:
    """One id for a special piece such as <|user|>; a tokenizer without it spells the marker as text."""
    i = tokenizer.token_id(piece)
    return [i] if i is not None else tokenizer.encode(piece)


def render_chat(tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """messages -> (ids, mask): <s> then <|role|> content <|end|> per message; mask 1 = trained on.

    The mask is 1 on each assistant reply's content tokens and its <|end|>, 0 on <s>, on every role
    token and on all system/user tokens. add_generation_prompt appends <|assistant|> (for chat).
    Markers written inside a content stay text (Tokenizer.encode_text_batch): only this function makes turns.
    """
    end = piece_ids(tokenizer, END_TOKEN)
    contents = tokenizer.encode_text_batch([m["content"] for m in messages]) if messages else []
    ids, mask = [tokenizer.bos_id], [0]
    for m, content in zip(messages, contents):
        if m["role"] not in ROLES:
            raise ValueError(f"unknown role {m['role']!r} (expected one of {', '.join(ROLES)})")
        role = piece_ids(tokenizer, ROLE_TOKENS[m["role"]])
        trained = int(m["role"] == "assistant")
        ids += role + content + end
        mask += [0] * len(role) + [trained] * (len(content) + len(end))
    if add_generation_prompt:
        role = piece_ids(tokenizer, ROLE_TOKENS["assistant"])
        ids += role
        mask += [0] * len(role)
    return ids, mask
