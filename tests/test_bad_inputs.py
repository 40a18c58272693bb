"""Bad input never ends in a traceback (issue 22): every case below runs a stage's main(argv) in this process
with something wrong in what the user gave (a flag out of range, a damaged or foreign file, an output path that
cannot be written) and checks the exit code, the one line that names the flag or file, that no other exception
escaped (one would be a traceback for the user), and that every file that existed before is unchanged.

Built once per module: two tokenizers with the same vocab size (one also as tokenizer.json), token files, SFT
token files and tiny checkpoint folders, plus damaged copies of them. Also here: special-token text inside data
stays text with every tokenizer kind, checked against the transformers tokenizer."""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import convert
import data_process
import dataset_sft
import eval as ev
import fine_tuning
import pretrain
import quantize
import train_tokenizer
from model import ModelArgs, Transformer
from tokenizer import Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = ("今天天气很好，我们一起去公园散步吧。The quick brown fox jumps over the lazy dog 42 times.\n"
        "他说：这本书写得很好，值得一读。Numbers like 3.14 and 2718 are spelled digit by digit.\n")
OTHER = ("春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。Lorem ipsum dolor sit amet, consectetur.\n"
         "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。Sed do eiusmod tempor incididunt ut labore.\n")


def write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb" if isinstance(data, bytes) else "w", encoding=None if isinstance(data, bytes) else "utf-8") as f:
        f.write(data)
    return str(path)


def edit_json(path, fn):
    with open(path, encoding="utf-8") as f:
        obj = json.load(f)
    fn(obj)
    write(path, json.dumps(obj))


def copy_prefix(src_prefix, dst_prefix, **meta_changes):
    """A copy of a token file (X.bin + X.json, + X_mask.bin) under another prefix, its meta changed."""
    for ext in (".bin", ".json", "_mask.bin"):
        if os.path.exists(src_prefix + ext):
            shutil.copyfile(src_prefix + ext, dst_prefix + ext)
    edit_json(dst_prefix + ".json", lambda m: m.update(meta_changes))
    return dst_prefix + ".bin"


def tiny_model(folder, vocab_size, tokenizer_path, max_seq_len=32):
    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=vocab_size, hidden_dim=64, max_seq_len=max_seq_len,
                     multiple_of=16, attn_impl="eager", bos_id=2, eos_id=3, pad_id=0)
    Transformer(args).save_pretrained(str(folder), tokenizer_path=tokenizer_path)
    return str(folder)


@pytest.fixture(scope="module")
def F(tmp_path_factory):
    """Paths of the fixtures (the files every case must leave as they are)."""
    from data_process import process
    from dataset_sft import prepare
    root = tmp_path_factory.mktemp("bad")
    f = {"root": str(root)}
    corpus, other = write(root / "corpus.txt", TEXT * 40), write(root / "other.txt", OTHER * 40)
    f["tok"] = train_tokenizer.train_tokenizer([corpus], str(root / "tok"), vocab_size=500, num_threads=1)
    f["tok_other"] = train_tokenizer.train_tokenizer([other], str(root / "tok_other"), vocab_size=500,
                                                     hf_files=False, num_threads=1)
    process([corpus], f["tok"], str(root / "data" / "x"), workers=1, val_ratio=0.1, progress=False)
    process([other], f["tok_other"], str(root / "data" / "o"), workers=1, val_ratio=0.0, progress=False)
    f["train"], f["other_train"] = str(root / "data" / "x_train.bin"), str(root / "data" / "o_train.bin")
    sft = write(root / "sft.jsonl", "".join(json.dumps({"conversations": [
        {"from": "human", "value": f"你好 {i}"}, {"from": "gpt", "value": "今天天气很好。"}]}) + "\n" for i in range(20)))
    prepare([sft], f["tok"], str(root / "data" / "sft"), progress=False)
    f["sft"] = str(root / "data" / "sft_train")
    vocab = Tokenizer(f["tok"]).vocab_size
    f["model"] = tiny_model(root / "model", vocab, f["tok"])
    f["model_other"] = tiny_model(root / "model_other", vocab, f["tok_other"])  # same vocab size, other tokenizer

    # damaged token files
    x = str(root / "data" / "x_train")
    f["meta_uint8"] = copy_prefix(x, str(root / "data" / "u8"), dtype="uint8")
    f["meta_f16"] = copy_prefix(x, str(root / "data" / "f16"), dtype="float16")
    f["meta_nodtype"] = copy_prefix(x, str(root / "data" / "nod"))
    edit_json(str(root / "data" / "nod.json"), lambda m: m.pop("dtype"))
    f["meta_nojson"] = copy_prefix(x, str(root / "data" / "nj"))
    write(root / "data" / "nj.json", '{"dtype": "uint16", ')
    f["sft_noeos"] = copy_prefix(f["sft"], str(root / "data" / "sft_noeos"))
    edit_json(str(root / "data" / "sft_noeos.json"), lambda m: m.pop("eos_id"))

    # damaged checkpoint folders
    def model_copy(name, damage):
        d = str(root / name)
        shutil.copytree(f["model"], d)
        damage(d)
        return d
    st = lambda d: os.path.join(d, "model.safetensors")  # noqa: E731
    cfg = lambda d: os.path.join(d, "config.json")  # noqa: E731
    f["ck_trunc"] = model_copy("ck_trunc", lambda d: os.truncate(st(d), os.path.getsize(st(d)) // 2))
    f["ck_cfg_notjson"] = model_copy("ck_cfg_notjson", lambda d: write(cfg(d), "{not json"))
    f["ck_cfg_list"] = model_copy("ck_cfg_list", lambda d: write(cfg(d), "[1, 2]"))
    f["ck_unknown_key"] = model_copy("ck_unknown_key", lambda d: edit_json(cfg(d), lambda c: c["model_args"].update(foo=1)))
    f["ck_heads_str"] = model_copy("ck_heads_str", lambda d: edit_json(cfg(d), lambda c: c["model_args"].update(n_heads="2")))
    f["ck_dim_zero"] = model_copy("ck_dim_zero", lambda d: edit_json(cfg(d), lambda c: c["model_args"].update(dim=0)))
    f["ck_dim_wrong"] = model_copy("ck_dim_wrong", lambda d: edit_json(cfg(d), lambda c: c["model_args"].update(hidden_dim=96)))

    def hf_only(c, drop=None, **changes):
        c.pop("model_args")
        if drop:
            c.pop(drop)
        c.update(changes)
    f["hf_no_hidden"] = model_copy("hf_no_hidden", lambda d: edit_json(cfg(d), lambda c: hf_only(c, "hidden_size")))
    f["hf_hidden_str"] = model_copy("hf_hidden_str", lambda d: edit_json(cfg(d), lambda c: hf_only(c, hidden_size="32")))
    f["hf_no_heads"] = model_copy("hf_no_heads", lambda d: edit_json(cfg(d), lambda c: hf_only(c, "num_attention_heads")))

    # Meta raw releases
    sd = {"tok_embeddings.weight": torch.zeros(vocab, 32), "norm.weight": torch.ones(32), "output.weight": torch.zeros(vocab, 32)}
    params = {"dim": 32, "n_layers": 1, "n_heads": 2, "vocab_size": vocab, "norm_eps": 1e-5}

    def meta_release(name, params_text, pth=True, truncate=False):
        d = root / name
        write(d / "params.json", params_text)
        if pth:
            torch.save(sd, str(d / "consolidated.00.pth"))
        if truncate:
            os.truncate(d / "consolidated.00.pth", os.path.getsize(d / "consolidated.00.pth") // 2)
        return str(d)
    f["meta_params_notjson"] = meta_release("meta_nj", "{dim: 32")
    f["meta_no_dim"] = meta_release("meta_nodim", json.dumps({k: v for k, v in params.items() if k != "dim"}))
    f["meta_heads_str"] = meta_release("meta_hs", json.dumps({**params, "n_heads": "2"}))
    f["meta_unknown"] = meta_release("meta_unk", json.dumps({**params, "moe": True}))
    f["meta_trunc"] = meta_release("meta_trunc", json.dumps(params), truncate=True)

    # other inputs
    f["a_file"] = write(root / "a_file", "I am a file, not a folder\n")
    f["garbage_tok"] = write(root / "garbage" / "tokenizer.model", b"\x00garbage\xff" * 10)
    f["garbage_json_tok"] = write(root / "garbage_json" / "tokenizer.json", '{"model": ')
    import zstandard
    good = zstandard.ZstdCompressor().compress(TEXT.encode() * 50)
    f["bad_zst"] = write(root / "bad.txt.zst", good[:30] + b"\x00" * 40)
    f["bad_zst_jsonl"] = write(root / "bad.jsonl.zst", b"not zstd at all" * 5)
    f["alpaca_list"] = write(root / "alpaca.jsonl", json.dumps({"instruction": "翻译", "input": ["a", "b"], "output": "好"}) + "\n")
    f["alpaca_instr_list"] = write(root / "alpaca2.jsonl", json.dumps({"instruction": ["x"], "output": "好"}) + "\n")
    f["sharegpt_from_list"] = write(root / "sharegpt.jsonl", json.dumps({"conversations": [
        {"from": ["human"], "value": "你好"}, {"from": "gpt", "value": "好"}]}) + "\n")
    return f


def snapshot(root):
    out = {}
    for d, _, files in os.walk(root):
        for name in files:
            p = os.path.join(d, name)
            with open(p, "rb") as fh:
                out[p] = hashlib.sha256(fh.read()).hexdigest()
    return out


# (id, stage, argv(F, tmp) -> list, exit code, regex of the one line)
EVAL = lambda F, *a: ["--model", F["model"], "--device", "cpu", *a]  # noqa: E731
GEN = lambda F, *a: ["generate", *EVAL(F, "--prompt", "你好", "--max_new_tokens", "2", *a)]  # noqa: E731
PT = lambda F, t, *a: ["--data", F["train"], "--out_dir", str(t / "pt"), "--model", "tiny", "--dim", "32", "--n_layers", "1",  # noqa: E731
                       "--n_heads", "2", "--max_seq_len", "16", "--max_steps", "1", "--tensorboard", "False", *a]
FT = lambda F, t, *a: ["--init_from", F["model"], "--train_data", F["sft"], "--out_dir", str(t / "ft"),  # noqa: E731
                       "--max_steps", "1", "--tensorboard", "False", *a]
QU = lambda F, t, *a: ["--model", F["model"], "--data", F["train"], "--out", str(t / "q"), "--device", "cpu",  # noqa: E731
                       "--nsamples", "2", "--seqlen", "8", "--group_size", "32", *a]
DP = lambda F, t, *a: ["--tokenizer", F["tok"], "--out", str(t / "dp" / "x"), "--workers", "1", *a]  # noqa: E731
SFT = lambda F, t, *a: ["prepare", "--tokenizer", F["tok"], "--out", str(t / "sft" / "x"), "--workers", "1", *a]  # noqa: E731
ARG = r"error: argument "  # argparse's own one line (exit 2), after its usage line

CASES = [
    # eval.py: sampling and window flags
    ("eval_top_p_2", ev, lambda F, t: GEN(F, "--top_p", "2"), 2, ARG + r"--top_p: 2 is outside \(0, 1\]"),
    ("eval_top_p_0", ev, lambda F, t: GEN(F, "--top_p", "0"), 2, ARG + r"--top_p: 0 is outside"),
    ("eval_top_k_0", ev, lambda F, t: GEN(F, "--top_k", "0"), 2, ARG + r"--top_k: 0 is outside \[1, inf\)"),
    ("eval_rep_penalty_0", ev, lambda F, t: GEN(F, "--repetition_penalty", "0"), 2, ARG + r"--repetition_penalty: 0 is outside"),
    ("eval_rep_penalty_neg", ev, lambda F, t: GEN(F, "--repetition_penalty", "-1.5"), 2, ARG + r"--repetition_penalty: -1.5"),
    ("eval_temperature_neg", ev, lambda F, t: GEN(F, "--temperature", "-1"), 2, ARG + r"--temperature: -1 is outside"),
    ("eval_temperature_nan", ev, lambda F, t: GEN(F, "--temperature", "nan"), 2, ARG + r"--temperature: 'nan' is not a finite"),
    ("eval_num_beams_0", ev, lambda F, t: GEN(F, "--num_beams", "0"), 2, ARG + r"--num_beams: 0 is outside"),
    ("eval_max_new_tokens_neg", ev, lambda F, t: GEN(F, "--max_new_tokens", "-3"), 2, ARG + r"--max_new_tokens: -3"),
    ("eval_max_seq_len_0", ev, lambda F, t: ["ppl", *EVAL(F, "--data", F["train"], "--max_seq_len", "0")], 2,
     ARG + r"--max_seq_len: 0 is outside"),
    ("eval_stride_0", ev, lambda F, t: ["ppl", *EVAL(F, "--data", F["train"], "--stride", "0")], 2, ARG + r"--stride: 0"),
    ("eval_stride_gt_context", ev, lambda F, t: ["ppl", *EVAL(F, "--data", F["train"], "--stride", "33")], 1,
     r"^--stride 33: larger than the context of 32 tokens"),
    ("eval_ppl_batch_size_0", ev, lambda F, t: ["ppl", *EVAL(F, "--data", F["train"], "--batch_size", "0")], 2, ARG + r"--batch_size"),
    ("eval_chat_no_room", ev, lambda F, t: ["chat", *EVAL(F, "--max_new_tokens", "32", "--chat_inputs", F["a_file"])], 1,
     r"^--max_new_tokens 32: leaves no room for a prompt in the context of 32 tokens"),
    # eval.py: files
    ("eval_ppl_meta_uint8", ev, lambda F, t: ["ppl", *EVAL(F, "--data", F["meta_uint8"])], 1, r"u8\.json: dtype 'uint8' is not a token dtype"),
    ("eval_ppl_other_tokenizer", ev, lambda F, t: ["ppl", *EVAL(F, "--data", F["other_train"])], 1,
     r"o_train\.bin: tokenized with tokenizer .* but this tokenizer has hash"),
    ("eval_model_trunc", ev, lambda F, t: ["generate", "--model", F["ck_trunc"], "--prompt", "x"], 1,
     r"ck_trunc/model\.safetensors: cannot read the weights, truncated"),
    ("eval_model_cfg_notjson", ev, lambda F, t: ["generate", "--model", F["ck_cfg_notjson"], "--prompt", "x"], 1,
     r"ck_cfg_notjson/config\.json: not JSON"),
    ("eval_garbage_tokenizer", ev, lambda F, t: GEN(F, "--tokenizer", F["garbage_tok"]), 1,
     r"garbage/tokenizer\.model: not a valid sentencepiece model"),
    ("eval_garbage_tokenizer_json", ev, lambda F, t: GEN(F, "--tokenizer", F["garbage_json_tok"]), 1,
     r"garbage_json/tokenizer\.json: not a valid tokenizer\.json"),
    # pretrain.py
    ("pretrain_batch_size_0", pretrain, lambda F, t: PT(F, t, "--batch_size", "0"), 2, ARG + r"--batch_size: 0 is outside"),
    ("pretrain_max_seq_len_neg", pretrain, lambda F, t: PT(F, t, "--max_seq_len", "-5"), 2, ARG + r"--max_seq_len: -5"),
    ("pretrain_grad_accum_0", pretrain, lambda F, t: PT(F, t, "--grad_accum", "0"), 2, ARG + r"--grad_accum"),
    ("pretrain_data_weight_nan", pretrain, lambda F, t: PT(F, t, "--data", F["train"] + ":nan"), 1,
     r"^--data .*x_train\.bin:nan: weight must be a finite number > 0"),
    ("pretrain_data_weight_inf", pretrain, lambda F, t: PT(F, t, "--data", F["train"] + ":inf"), 1, r"weight must be a finite"),
    ("pretrain_meta_uint8", pretrain, lambda F, t: PT(F, t, "--data", F["meta_uint8"]), 1, r"dtype 'uint8' is not a token dtype"),
    ("pretrain_meta_float16", pretrain, lambda F, t: PT(F, t, "--data", F["meta_f16"]), 1, r"dtype 'float16' is not a token dtype"),
    ("pretrain_meta_no_dtype", pretrain, lambda F, t: PT(F, t, "--data", F["meta_nodtype"]), 1, r"nod\.json: dtype None is not"),
    ("pretrain_meta_not_json", pretrain, lambda F, t: PT(F, t, "--data", F["meta_nojson"]), 1, r"nj\.json: not a token-file meta: not JSON"),
    ("pretrain_init_from_other_tokenizer", pretrain, lambda F, t: PT(F, t, "--init_from", F["model_other"]), 1,
     r"^--init_from .*model_other: trained with tokenizer hash \w+, but the tokenizer in use has hash"),
    ("pretrain_init_from_trunc", pretrain, lambda F, t: PT(F, t, "--init_from", F["ck_trunc"]), 1, r"cannot read the weights"),
    ("pretrain_init_from_cfg_notjson", pretrain, lambda F, t: PT(F, t, "--init_from", F["ck_cfg_notjson"]), 1, r"config\.json: not JSON"),
    ("pretrain_out_dir_is_file", pretrain, lambda F, t: PT(F, t, "--out_dir", F["a_file"]), 1, r"^--out_dir .*a_file: is a file, not a folder"),
    ("pretrain_out_dir_under_file", pretrain, lambda F, t: PT(F, t, "--out_dir", F["a_file"] + "/run"), 1,
     r"^--out_dir .*a_file/run: .*a_file is a file, not a folder"),
    ("pretrain_out_dir_read_only", pretrain, lambda F, t: PT(F, t, "--out_dir", "/sys/kernel/llm_run"), 1,
     r"^--out_dir /sys/kernel/llm_run: cannot write in /sys/kernel"),
    ("pretrain_garbage_tokenizer", pretrain, lambda F, t: PT(F, t, "--tokenizer", F["garbage_tok"]), 1, r"not a valid sentencepiece"),
    # fine_tuning.py
    ("sft_batch_size_0", fine_tuning, lambda F, t: FT(F, t, "--batch_size", "0"), 2, ARG + r"--batch_size: 0"),
    ("sft_max_seq_len_neg", fine_tuning, lambda F, t: FT(F, t, "--max_seq_len", "-5"), 2, ARG + r"--max_seq_len: -5"),
    ("sft_init_from_other_tokenizer", fine_tuning, lambda F, t: FT(F, t, "--init_from", F["model_other"], "--tokenizer", F["tok"]), 1,
     r"^--init_from .*model_other: trained with tokenizer hash"),
    ("sft_init_from_trunc", fine_tuning, lambda F, t: FT(F, t, "--init_from", F["ck_trunc"]), 1, r"cannot read the weights"),
    ("sft_init_from_cfg_notjson", fine_tuning, lambda F, t: FT(F, t, "--init_from", F["ck_cfg_notjson"]), 1, r"config\.json: not JSON"),
    ("sft_data_other_tokenizer", fine_tuning, lambda F, t: FT(F, t, "--train_data", F["other_train"]), 1, r"o_train\.bin: tokenized with tokenizer .* but this tokenizer has hash"),
    ("sft_data_no_eos_id", fine_tuning, lambda F, t: FT(F, t, "--train_data", F["sft_noeos"]), 1, r"sft_noeos.*: its meta has no eos_id"),
    ("sft_out_dir_is_file", fine_tuning, lambda F, t: FT(F, t, "--out_dir", F["a_file"]), 1, r"^--out_dir .*: is a file, not a folder"),
    # quantize.py
    ("quantize_calib_other_tokenizer", quantize, lambda F, t: QU(F, t, "--data", F["other_train"]), 1,
     r"o_train\.bin: tokenized with tokenizer .* but this tokenizer has hash"),
    ("quantize_calib_meta_uint8", quantize, lambda F, t: QU(F, t, "--data", F["meta_uint8"]), 1, r"dtype 'uint8'"),
    ("quantize_batch_size_0", quantize, lambda F, t: QU(F, t, "--batch_size", "0"), 2, ARG + r"--batch_size"),
    ("quantize_out_is_file", quantize, lambda F, t: QU(F, t, "--out", F["a_file"]), 1, r"^--out .*a_file: "),
    ("quantize_model_trunc", quantize, lambda F, t: QU(F, t, "--model", F["ck_trunc"]), 1, r"cannot read the weights"),
    # convert.py
    ("convert_cfg_notjson", convert, lambda F, t: [F["ck_cfg_notjson"], str(t / "c")], 1, r"config\.json: not JSON"),
    ("convert_cfg_not_object", convert, lambda F, t: [F["ck_cfg_list"], str(t / "c")], 1, r"config\.json: expected a JSON object"),
    ("convert_safetensors_trunc", convert, lambda F, t: [F["ck_trunc"], str(t / "c")], 1, r"model\.safetensors: cannot read"),
    ("convert_unknown_model_args_key", convert, lambda F, t: [F["ck_unknown_key"], str(t / "c")], 1,
     r"config\.json: foo: not a ModelArgs field"),
    ("convert_n_heads_str", convert, lambda F, t: [F["ck_heads_str"], str(t / "c")], 1, r"config\.json: n_heads: '2' is not of type int"),
    ("convert_dim_zero", convert, lambda F, t: [F["ck_dim_zero"], str(t / "c")], 1, r"config\.json: dim: 0 must be > 0"),
    ("convert_weights_not_config", convert, lambda F, t: [F["ck_dim_wrong"], str(t / "c")], 1, r"weights do not match the config"),
    ("convert_hf_missing_hidden_size", convert, lambda F, t: [F["hf_no_hidden"], str(t / "c")], 1, r"config\.json: hidden_size: missing"),
    ("convert_hf_hidden_size_str", convert, lambda F, t: [F["hf_hidden_str"], str(t / "c")], 1,
     r"config\.json: hidden_size: '32' is not a positive integer"),
    ("convert_hf_missing_n_heads", convert, lambda F, t: [F["hf_no_heads"], str(t / "c")], 1, r"config\.json: num_attention_heads: missing"),
    ("convert_params_notjson", convert, lambda F, t: [F["meta_params_notjson"], str(t / "c")], 1, r"params\.json: not JSON"),
    ("convert_params_no_dim", convert, lambda F, t: [F["meta_no_dim"], str(t / "c")], 1, r"params\.json: dim: missing"),
    ("convert_params_n_heads_str", convert, lambda F, t: [F["meta_heads_str"], str(t / "c")], 1,
     r"params\.json: n_heads: '2' is not a positive integer"),
    ("convert_params_unknown_key", convert, lambda F, t: [F["meta_unknown"], str(t / "c")], 1, r"params\.json: moe: not supported"),
    ("convert_pth_trunc", convert, lambda F, t: [F["meta_trunc"], str(t / "c")], 1, r"consolidated\.00\.pth: cannot read the weights"),
    ("convert_dst_is_file", convert, lambda F, t: [F["model"], F["a_file"]], 1, r"^dst .*a_file: is a file, not a folder"),
    ("convert_dst_read_only", convert, lambda F, t: [F["model"], "/sys/kernel/llm_out"], 1, r"^dst /sys/kernel/llm_out: cannot write"),
    ("convert_max_seq_len_0", convert, lambda F, t: [F["model"], str(t / "c"), "--max_seq_len", "0"], 2, ARG + r"--max_seq_len"),
    # data_process.py, dataset_sft.py, train_tokenizer.py
    ("data_process_corrupt_zst", data_process, lambda F, t: DP(F, t, "--input", F["bad_zst"]), 1,
     r"bad\.txt\.zst: read error, damaged or truncated file"),
    ("data_process_not_zst", data_process, lambda F, t: DP(F, t, "--input", F["bad_zst_jsonl"]), 1, r"bad\.jsonl\.zst: read error"),
    ("data_process_garbage_tokenizer", data_process, lambda F, t: DP(F, t, "--input", F["root"] + "/corpus.txt",
                                                                     "--tokenizer", F["garbage_tok"]), 1, r"not a valid sentencepiece"),
    ("data_process_out_under_file", data_process, lambda F, t: DP(F, t, "--input", F["root"] + "/corpus.txt",
                                                                  "--out", F["a_file"] + "/x"), 1, r"^--out .*a_file: is a file, not a folder"),
    ("data_process_workers_0", data_process, lambda F, t: DP(F, t, "--input", F["root"] + "/corpus.txt", "--workers", "0"), 2, ARG + r"--workers"),
    ("data_process_val_ratio_1", data_process, lambda F, t: DP(F, t, "--input", F["root"] + "/corpus.txt", "--val_ratio", "1"), 2,
     ARG + r"--val_ratio: 1 is outside \[0, 1\)"),
    ("sft_alpaca_input_list", dataset_sft, lambda F, t: SFT(F, t, "--data", F["alpaca_list"]), 1,
     r"alpaca\.jsonl:1: sample 0: field 'input' must be a string, got list"),
    ("sft_alpaca_instruction_list", dataset_sft, lambda F, t: SFT(F, t, "--data", F["alpaca_instr_list"]), 1,
     r"alpaca2\.jsonl:1: sample 0: field 'instruction' must be a string"),
    ("sft_sharegpt_from_list", dataset_sft, lambda F, t: SFT(F, t, "--data", F["sharegpt_from_list"]), 1,
     r"sharegpt\.jsonl:1: sample 0: conversations\[0\]: unknown role \['human'\]"),
    ("sft_corrupt_zst", dataset_sft, lambda F, t: SFT(F, t, "--data", F["bad_zst_jsonl"]), 1, r"bad\.jsonl\.zst: read error"),
    ("sft_out_is_under_file", dataset_sft, lambda F, t: SFT(F, t, "--data", F["alpaca_list"], "--out", F["a_file"] + "/x"), 1,
     r"^--out .*a_file: is a file, not a folder"),
    ("tokenizer_out_dir_is_file", train_tokenizer, lambda F, t: ["--input", F["root"] + "/corpus.txt", "--out_dir", F["a_file"]], 1,
     r"^--out_dir .*a_file: is a file, not a folder"),
    ("tokenizer_vocab_size_0", train_tokenizer, lambda F, t: ["--input", F["root"] + "/corpus.txt", "--vocab_size", "0"], 2,
     ARG + r"--vocab_size"),
    ("tokenizer_corrupt_zst", train_tokenizer, lambda F, t: ["--input", F["bad_zst"], "--out_dir", str(t / "tk")], 1,
     r"bad\.txt\.zst: read error"),
]


def run_main(stage, argv, capsys):
    """(exit code, stderr) of stage.main(argv) as a user would see them; any exception but SystemExit fails."""
    try:
        stage.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        if not isinstance(e.code, int) and e.code is not None:
            print(e.code, file=sys.stderr)  # what the interpreter prints for SystemExit("message")
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, F, tmp_path, capsys, monkeypatch):
    name, stage, argv, want_code, pattern = case
    monkeypatch.chdir(tmp_path)  # nothing written into the repo whatever happens
    before = snapshot(F["root"])
    code, err = run_main(stage, argv(F, tmp_path), capsys)
    assert "Traceback" not in err
    assert code == want_code, f"{name}: exit {code}, stderr:\n{err}"
    # argparse's usage lines and progress bars aside, the user reads one line
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("usage:", " ", "progress:"))]
    assert len(lines) == 1, f"{name}: expected one line, got:\n{err}"
    assert re.search(pattern, lines[0]), f"{name}: {lines[0]!r} does not match {pattern!r}"
    assert snapshot(F["root"]) == before, f"{name}: a pre-existing file changed"


def test_full_disk_is_one_line(F, tmp_path, capsys, monkeypatch):
    """A write that fails (ENOSPC) while a stage saves: the stage's error boundary names the file, no traceback."""
    import errno

    import safetensors.torch

    def full(state, path, metadata=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    code, err = run_main(convert, [F["model"], str(tmp_path / "c")], capsys)
    assert code == 1 and "Traceback" not in err
    assert err.strip().endswith("No space left on device") and "model.safetensors" in err


def test_chat_stdin_not_utf8(F):
    """Invalid UTF-8 on chat's stdin: one line naming stdin and the line (a real process: stdin is the point)."""
    p = subprocess.run([sys.executable, os.path.join(REPO, "eval.py"), "chat", "--model", F["model"], "--device", "cpu",
                        "--max_new_tokens", "2"], input=b"hello\n\xff\xfe bad\n", capture_output=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    err = p.stderr.decode()
    assert p.returncode == 1 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("stdin:2: not valid UTF-8")


def test_chat_never_decodes_past_the_context(F):
    """A turn that cannot fit with room for max_new_tokens is not answered, and a note says so."""
    import io

    from engine import Decoder, GenerationConfig
    model = Transformer.from_pretrained(F["model"]).eval()
    tok = Tokenizer(F["model"])
    out = io.StringIO()
    ev.chat(Decoder(model), tok, GenerationConfig(max_new_tokens=8, stop_ids=[tok.eos_id]),
            ["你好", OTHER.replace("\n", " ") * 3, "好"], context=32, out=out)
    lines = out.getvalue().splitlines()
    assert [line.split(":")[0] for line in lines] == ["user", "assistant", "user", "note", "user", "assistant"]
    assert "not answered" in lines[3]


@pytest.mark.parametrize("text", ["a</s>b", "<s>你好</s>", "x <pad> y", "</s></s>", "tail <|endoftext|>"])
def test_special_token_text_is_text(F, text):
    """Literal "</s>" / "<s>" in data is text with tokenizer.json as with tokenizer.model (issue 22, item 6), and
    transformers with split_special_tokens=True reads the same ids."""
    from transformers import AutoTokenizer
    folder = os.path.dirname(F["tok"])
    sp, hf = Tokenizer(os.path.join(folder, "tokenizer.model")), Tokenizer(os.path.join(folder, "tokenizer.json"))
    ids = hf.encode(text)
    assert ids == sp.encode(text) == hf.encode_text_batch([text])[0]
    assert not {hf.eos_id, hf.bos_id, hf.pad_id} & set(ids)
    ref = AutoTokenizer.from_pretrained(folder, split_special_tokens=True)
    assert ref(text, add_special_tokens=False)["input_ids"] == ids
    assert hf.decode(ids) == text


def test_special_token_text_in_documents_and_sft(F, tmp_path):
    """Through the stages: one EOS per document in a token file, and one per sample in an SFT file, whatever the
    documents and turns spell."""
    import numpy as np

    from data_process import process
    from dataset_sft import prepare
    from tokens import load_token_file
    tok_json = os.path.join(os.path.dirname(F["tok"]), "tokenizer.json")
    docs = write(tmp_path / "docs.txt", "first </s> document <s> here\nsecond</s></s>\nthird <pad> one\n")
    process([docs], tok_json, str(tmp_path / "d"), workers=1, val_ratio=0.0, progress=False)
    ids, meta = load_token_file(str(tmp_path / "d_train"))
    assert meta["n_docs"] == 3 and int(np.count_nonzero(ids == meta["eos_id"])) == 3
    assert meta["bos_id"] not in ids.tolist()
    sft = write(tmp_path / "s.jsonl", json.dumps({"conversations": [
        {"from": "human", "value": "say </s> and <s>"}, {"from": "gpt", "value": "ok </s> done"}]}) + "\n")
    prepare([sft], tok_json, str(tmp_path / "s"), progress=False)
    ids, meta = load_token_file(str(tmp_path / "s_train"))
    assert meta["n_docs"] == 1 and int(np.count_nonzero(ids == meta["eos_id"])) == 1
    assert ids.tolist().count(meta["bos_id"]) == 1  # render_chat's own <s> only


def test_max_new_tokens_0_is_allowed(F, capsys):
    """--max_new_tokens 0 (>= 0 is the range) gives the prompt back, with beams too."""
    ev.main(["generate", *EVAL(F, "--prompt", "你好", "--max_new_tokens", "0", "--num_beams", "2")])
    assert "new_tokens: 0" in capsys.readouterr().out
