"""convert.py: HF <-> ours for Llama and GPT-NeoX, and Meta's raw sharded checkpoints -> ours."""
import contextlib
import io
import json
import os
import subprocess
import sys

import pytest
import torch
import transformers

from convert import convert
from convert import main as convert_main
from model import Transformer
from test_model import V, hf_llama, hf_neox, tokens

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args):
    """convert.py's main() in this process (a subprocess per call costs seconds): (returncode, stdout, error)."""
    old, sys.argv = sys.argv, ["convert.py", *map(str, args)]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            convert_main()
        return 0, out.getvalue(), ""
    except SystemExit as e:
        return (0 if e.code in (0, None) else 1), out.getvalue(), str(e.code)
    finally:
        sys.argv = old


def test_help_as_a_script():
    r = subprocess.run([sys.executable, os.path.join(REPO, "convert.py"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--to" in r.stdout and "--max_seq_len" in r.stdout


def test_cli_hf_llama_to_ours_and_back(tmp_path):
    hf, folder = hf_llama(tmp_path / "hf", n_kv_heads=2, rope={"rope_type": "yarn", "factor": 2.0})
    (folder / "tokenizer.model").write_bytes(b"spm bytes")
    code, out, err = run_cli(folder, tmp_path / "ours")
    assert code == 0, err
    assert "from: hf" in out and "arch: llama" in out
    assert (tmp_path / "ours" / "tokenizer.model").read_bytes() == b"spm bytes"
    ours = Transformer.from_pretrained(tmp_path / "ours", attn_impl="eager").eval()
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-5, rtol=1e-5)
    code, out, err = run_cli(tmp_path / "ours", tmp_path / "hf2", "--to", "hf")
    assert code == 0, err
    assert "model_args" not in json.loads((tmp_path / "hf2" / "config.json").read_text())
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf2")
    a, b = hf.state_dict(), hf2.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_neox_both_ways(tmp_path):
    hf, folder = hf_neox(tmp_path / "hf", rotary_pct=0.25)
    convert(folder, tmp_path / "ours")
    convert(tmp_path / "ours", tmp_path / "hf2", to="hf")
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf2", attn_implementation="eager").eval()
    assert isinstance(hf2, transformers.GPTNeoXForCausalLM)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(hf2(x).logits, hf(x).logits, atol=0, rtol=0)


def hf_to_meta_rope_layout(w, n_heads):
    """The inverse of convert.meta_to_hf_rope_layout, written from Meta's side: HF's rotate-half halves
    (i, i + d/2) become adjacent pairs (2i, 2i+1) again."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def write_meta_checkpoint(hf, folder, n_shards=2, vocab_split_dim=1):
    """Meta's release layout built from a transformers model: params.json + consolidated.NN.pth, weights
    in Meta's names and interleaved q/k rows, split across tensor-parallel shards as fairscale does."""
    c = hf.config
    sd = hf.state_dict()
    meta = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
            "output.weight": sd["lm_head.weight"]}
    names = {"q_proj": "attention.wq", "k_proj": "attention.wk", "v_proj": "attention.wv", "o_proj": "attention.wo",
             "gate_proj": "feed_forward.w1", "up_proj": "feed_forward.w3", "down_proj": "feed_forward.w2"}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        for hf_name, meta_name in names.items():
            part = "self_attn" if hf_name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            w = sd[f"{p}{part}.{hf_name}.weight"]
            if hf_name == "q_proj":
                w = hf_to_meta_rope_layout(w, c.num_attention_heads)
            if hf_name == "k_proj":
                w = hf_to_meta_rope_layout(w, c.num_key_value_heads)
            meta[f"layers.{i}.{meta_name}.weight"] = w
        meta[f"layers.{i}.attention_norm.weight"] = sd[f"{p}input_layernorm.weight"]
        meta[f"layers.{i}.ffn_norm.weight"] = sd[f"{p}post_attention_layernorm.weight"]
    # column-parallel (output rows) vs row-parallel (input columns) splits
    split = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": vocab_split_dim}
    shards = [{} for _ in range(n_shards)]
    for k, w in meta.items():
        kind = k.split(".")[-2]
        for s, piece in enumerate(w.chunk(n_shards, dim=split[kind]) if w.ndim == 2 else [w] * n_shards):
            shards[s][k] = piece.clone()
    os.makedirs(folder)
    for s, shard in enumerate(shards):
        torch.save(shard, os.path.join(folder, f"consolidated.{s:02d}.pth"))
    params = {"dim": c.hidden_size, "n_layers": c.num_hidden_layers, "n_heads": c.num_attention_heads,
              "n_kv_heads": c.num_key_value_heads, "vocab_size": c.vocab_size, "multiple_of": 32,
              "norm_eps": c.rms_norm_eps, "rope_theta": 10000.0}
    with open(os.path.join(folder, "params.json"), "w") as f:
        json.dump(params, f)


@pytest.mark.parametrize("vocab_split_dim", [1, 0], ids=["llama2_embedding", "llama3_embedding"])
def test_meta_sharded_checkpoint_converts_to_same_logits(tmp_path, vocab_split_dim):
    hf, _ = hf_llama(tmp_path / "hf", n_kv_heads=2)
    write_meta_checkpoint(hf, tmp_path / "meta", n_shards=2, vocab_split_dim=vocab_split_dim)
    code, out, err = run_cli(tmp_path / "meta", tmp_path / "ours", "--max_seq_len", 32)
    assert code == 0, err
    assert "from: meta" in out
    ours = Transformer.from_pretrained(tmp_path / "ours", attn_impl="eager").eval()
    assert (ours.args.vocab_size, ours.args.n_kv_heads) == (V, 2)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-5, rtol=1e-5)


def test_meta_without_unpermuting_would_differ(tmp_path):
    """The q/k permutation matters: skipping the inverse permutation changes the logits (the test above
    can fail)."""
    hf, _ = hf_llama(tmp_path / "hf", n_kv_heads=2)
    write_meta_checkpoint(hf, tmp_path / "meta")
    convert(tmp_path / "meta", tmp_path / "ours", max_seq_len=32)
    ours = Transformer.from_pretrained(tmp_path / "ours", attn_impl="eager").eval()
    with torch.no_grad():
        ours.model.layers[0].self_attn.q_proj.weight.copy_(
            hf_to_meta_rope_layout(ours.model.layers[0].self_attn.q_proj.weight, 4))
        assert (ours(tokens()) - hf(tokens()).logits).abs().max() > 1e-3


def test_unknown_rope_type_is_one_line_error(tmp_path):
    _, folder = hf_llama(tmp_path / "hf")
    c = json.loads((folder / "config.json").read_text())
    c["rope_parameters"]["rope_type"] = "su"
    (folder / "config.json").write_text(json.dumps(c))
    code, _, err = run_cli(folder, tmp_path / "out")
    assert code == 1 and "\n" not in err
    assert err.endswith(
        "config.json: rope_scaling.rope_type: unsupported 'su' (supported: default, linear, ntk, dynamic, yarn, llama3)")


def test_unknown_meta_param_is_one_line_error(tmp_path):
    hf, _ = hf_llama(tmp_path / "hf")
    write_meta_checkpoint(hf, tmp_path / "meta")
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    params["moe_experts"] = 8
    (tmp_path / "meta" / "params.json").write_text(json.dumps(params))
    code, _, err = run_cli(tmp_path / "meta", tmp_path / "out")
    assert code == 1 and "\n" not in err and err.endswith("params.json: moe_experts: not supported")
