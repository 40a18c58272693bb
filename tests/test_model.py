"""model.py is the same model as transformers' LlamaForCausalLM / GPTNeoXForCausalLM, and its backends,
cache and packing agree with the eager reference. Tiny random configs, fp32, CPU."""
import json

import pytest
import torch
import torch.nn.functional as F
import transformers

import attention as A
from attention import build_attn_mask, doc_ids_from_eos, flex_attention, position_ids_from_doc_ids, resolve_attn_impl
from checkpoint import hf_config
from loss import chunked_cross_entropy
from model import ModelArgs, RotaryEmbedding, Transformer

V, MAXPOS, LONG = 97, 32, 48  # LONG > MAXPOS: rope scaling is exercised past the trained length


def randomize(model, seed=0):
    """Weights large enough that a wrong rotation or mask shows in the logits (HF's 0.02 init hides it)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if name.endswith("layernorm.weight") or name.endswith("norm.weight") else 0.0
            p.copy_(base + 0.15 * torch.randn(p.shape, generator=g))
    return model


def hf_llama(tmp_path, n_kv_heads=4, tied=False, rope=None, legacy_rope=False):
    """A random transformers Llama saved to a folder; returns (hf_model, folder)."""
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=n_kv_heads,
                                   max_position_embeddings=MAXPOS, rms_norm_eps=1e-5, tie_word_embeddings=tied,
                                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0, **(rope or {})},
                                   attn_implementation="eager")
    hf = randomize(transformers.LlamaForCausalLM(cfg)).eval()
    hf.save_pretrained(tmp_path)
    if legacy_rope:  # a transformers-4 era config.json: "rope_scaling" with "type", "rope_theta" beside it
        path = tmp_path / "config.json"
        c = json.loads(path.read_text())
        c.pop("rope_parameters")
        c["rope_theta"], c["rope_scaling"] = 10000.0, {"type": rope["rope_type"], "factor": rope["factor"]}
        path.write_text(json.dumps(c))
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    return hf, tmp_path


def hf_neox(tmp_path, rotary_pct=0.25, parallel=True, tied=False, rope=None):
    cfg = transformers.GPTNeoXConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=MAXPOS,
                                     use_parallel_residual=parallel, tie_word_embeddings=tied,
                                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                      "partial_rotary_factor": rotary_pct, **(rope or {})},
                                     attn_implementation="eager")
    hf = randomize(transformers.GPTNeoXForCausalLM(cfg)).eval()
    hf.save_pretrained(tmp_path)
    return hf, tmp_path


def tokens(B=2, T=LONG, seed=0):
    return torch.randint(3, V, (B, T), generator=torch.Generator().manual_seed(seed))


def assert_same_logits(hf, ours, x):
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_llama_matches_transformers(tmp_path, n_kv_heads, tied):
    hf, folder = hf_llama(tmp_path, n_kv_heads, tied)
    ours = Transformer.from_pretrained(folder, attn_impl="eager").eval()
    assert ours.args.n_kv_heads == n_kv_heads and ours.args.tie_word_embeddings == tied
    assert_same_logits(hf, ours, tokens())


@pytest.mark.parametrize("n_kv_heads", [4, 2], ids=["mha", "gqa"])
def test_llama_training_gradients_match_transformers(tmp_path, n_kv_heads):
    """Training mode, our fused cross-entropy (gradients computed in forward): every gradient, by HF name,
    equals transformers' autograd through its logits and plain cross-entropy."""
    hf, folder = hf_llama(tmp_path, n_kv_heads)
    ours = Transformer.from_pretrained(folder, attn_impl="eager").train()
    x, y = tokens(), tokens(seed=1)
    hf.train()
    F.cross_entropy(hf(x).logits.flatten(0, 1), y.flatten()).backward()
    ours(x, targets=y).backward()
    hf_grads = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, hf_grads[name].grad, atol=1e-5, rtol=1e-4, msg=name)


ROPES = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "yarn_mscale": {"rope_type": "yarn", "factor": 4.0, "mscale": 1.0, "mscale_all_dim": 0.5,
                    "beta_fast": 16, "beta_slow": 2},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
}


@pytest.mark.parametrize("name", list(ROPES))
def test_rope_scaling_matches_transformers_past_trained_length(tmp_path, name):
    hf, folder = hf_llama(tmp_path / "hf", 2, rope=ROPES[name])
    ours = Transformer.from_pretrained(folder, attn_impl="eager").eval()
    assert ours.args.rope_scaling["rope_type"] == ROPES[name]["rope_type"]
    x = tokens(T=LONG)
    assert_same_logits(hf, ours, x)
    # the scaling changes the model (so the comparison above could fail): same weights, plain RoPE
    plain = Transformer.from_pretrained(folder, attn_impl="eager", rope_scaling=None).eval()
    with torch.no_grad():
        assert (plain(x) - ours(x)).abs().max() > 1e-3
    # and what we save loads in transformers with the same logits
    ours.save_pretrained(tmp_path / "ours")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    assert_same_logits(back, ours, x)


def test_neox_rope_scaling_matches_transformers(tmp_path):
    hf, folder = hf_neox(tmp_path, rotary_pct=0.5, rope={"rope_type": "dynamic", "factor": 3.0})
    ours = Transformer.from_pretrained(folder, attn_impl="eager").eval()
    assert_same_logits(hf, ours, tokens(T=LONG))


def test_legacy_rope_scaling_key(tmp_path):
    hf, folder = hf_llama(tmp_path, rope={"rope_type": "linear", "factor": 3.0}, legacy_rope=True)
    ours = Transformer.from_pretrained(folder, attn_impl="eager").eval()
    assert ours.args.rope_scaling == {"rope_type": "linear", "factor": 3.0}
    assert_same_logits(hf, ours, tokens())


def test_ntk_fixed_alpha_exports_as_stretched_base(tmp_path):
    """NTK-aware scaling is not a transformers rope type; it is plain RoPE with base*alpha^(d/(d-2))."""
    ours = randomize(Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=V, hidden_dim=96,
                                           max_seq_len=MAXPOS, attn_impl="eager",
                                           rope_scaling={"rope_type": "ntk", "factor": 4.0}))).eval()
    ours.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert hf.config.rope_parameters["rope_theta"] == pytest.approx(10000.0 * 4.0 ** (16 / 14))
    assert_same_logits(hf, ours, tokens(T=LONG))


@pytest.mark.parametrize("rotary_pct", [0.25, 1.0])
@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "sequential"])
def test_neox_matches_transformers(tmp_path, rotary_pct, parallel):
    hf, folder = hf_neox(tmp_path, rotary_pct, parallel)
    ours = Transformer.from_pretrained(folder, attn_impl="eager").eval()
    assert ours.args.arch == "neox" and ours.args.rotary_pct == rotary_pct
    assert_same_logits(hf, ours, tokens())


def test_neox_tied_matches_transformers(tmp_path):
    hf, folder = hf_neox(tmp_path, tied=True)
    assert_same_logits(hf, Transformer.from_pretrained(folder, attn_impl="eager").eval(), tokens())


def tiny(arch="llama", **kw):
    kw = {"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": V, "max_seq_len": 64, "attn_impl": "eager",
          **({"n_kv_heads": 2, "hidden_dim": 96} if arch == "llama" else {"rotary_pct": 0.25}), **kw}
    return randomize(Transformer(ModelArgs(arch=arch, **kw))).eval()


def flex_runs_on_cpu():
    if flex_attention is None:
        return False
    try:
        with torch.no_grad():
            q = torch.randn(1, 1, 8, 16)
            flex_attention(q, q, q)
        return True
    except Exception:
        return False


BACKENDS = ["sdpa"] + (["flex"] if flex_runs_on_cpu() else [])


def packed_row():
    """Two rows of three documents each (EOS = 2 ends a document), the reset_position_ids positions."""
    x = tokens(T=40)
    x[0, 9], x[0, 25], x[1, 14], x[1, 30] = 2, 2, 2, 2
    doc_ids = doc_ids_from_eos(x, 2)
    return x, doc_ids, position_ids_from_doc_ids(doc_ids)


@pytest.mark.parametrize("name", [None] + list(ROPES))
def test_rope_tables_equal_the_computed_angles(name):
    """Positions below max_seq_len read the tables; a larger bound takes the computed path. Both agree, also
    after model.to(bf16) (the tables are remade in fp32 from the cast inv_freq); dynamic NTK always computes."""
    rotary = RotaryEmbedding(ModelArgs.preset("tiny", max_seq_len=64, rope_scaling=ROPES[name] if name else None))
    pos = torch.tensor([[0, 1, 5, 63], [7, 7, 2, 40]])
    for dtype in (torch.float32, torch.bfloat16):
        rotary.to(dtype)
        assert rotary.cos_table.dtype == torch.float32
        assert len(rotary.cos_table) == (0 if name == "dynamic" else 64)
        for table, computed in zip(rotary(pos, max_pos=64), rotary(pos, max_pos=65)):
            torch.testing.assert_close(table, computed, atol=1e-6, rtol=1e-6)
    assert rotary(pos, max_pos=64)[0].abs().max() > 0.5  # real values


def test_packing_helpers():
    x, doc_ids, pos = packed_row()
    assert doc_ids[0, 9] == 0 and doc_ids[0, 10] == 1 and doc_ids[0, 26] == 2
    assert pos[0, 9] == 9 and pos[0, 10] == 0 and pos[0, 26] == 0 and pos[1, 39] == 39 - 31


@pytest.mark.parametrize("arch", ["llama", "neox"])
@pytest.mark.parametrize("impl", BACKENDS)
@torch.no_grad()
def test_backends_give_eager_logits(arch, impl):
    model = tiny(arch)
    x, doc_ids, pos = packed_row()
    ref, ref_packed = model(x), model(x, doc_ids=doc_ids, position_ids=pos)
    model.args.attn_impl = impl
    torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(x, doc_ids=doc_ids, position_ids=pos), ref_packed, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["eager"] + BACKENDS)
@torch.no_grad()
def test_no_leakage_between_packed_documents(impl):
    model = tiny(attn_impl=impl)
    x, doc_ids, pos = packed_row()
    packed = model(x, doc_ids=doc_ids, position_ids=pos)
    alone = model(x[:1, 10:26])  # the 2nd document of row 0, run by itself
    torch.testing.assert_close(packed[:1, 10:26], alone, atol=1e-5, rtol=1e-5)
    # without the mask the 2nd document does see the first (the test can fail)
    assert (model(x, position_ids=pos)[:1, 10:26] - alone).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["llama", "neox"])
@torch.no_grad()
def test_kv_cache_matches_full_forward(arch):
    model = tiny(arch)
    x = tokens(T=20)
    full = model(x)
    cache = model.new_cache(2, 32)
    steps = [model(x[:, :7], cache=cache)] + [model(x[:, t:t + 1], cache=cache) for t in range(7, 20)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    # explicit slot positions (what a compiled decode step passes) give the same
    cache = model.new_cache(2, 32)
    model(x[:, :19], cache=cache, cache_pos=torch.arange(19))
    last = model(x[:, 19:], cache=cache, cache_pos=torch.tensor([19]))
    torch.testing.assert_close(last, full[:, 19:], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_left_padded_generate_equals_one_by_one_and_transformers(tmp_path):
    model = tiny(max_seq_len=MAXPOS, pad_id=0, eos_id=2)
    lengths = [5, 9, 7]
    prompts = [tokens(1, n, seed=i)[0] for i, n in enumerate(lengths)]
    T = max(lengths)
    batch = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, p in enumerate(prompts):
        batch[i, T - len(p):], mask[i, T - len(p):] = p, 1
    out = model.generate(batch, 12, attention_mask=mask)
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], 12)
        n = alone.shape[1] - len(p)  # a row may stop early at EOS
        assert torch.equal(out[i, T:T + n], alone[0, len(p):])
    model.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    hf_out = hf.generate(batch, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                         eos_token_id=2)
    assert torch.equal(out, hf_out)


@torch.no_grad()
def test_sampling_filters():
    model = tiny()
    x = tokens(T=6)
    greedy = model.generate(x, 5)
    torch.manual_seed(0)
    assert torch.equal(model.generate(x, 5, temperature=1.0, top_k=1), greedy)
    assert torch.equal(model.generate(x, 5, temperature=1.0, top_p=1e-6), greedy)
    torch.manual_seed(0)
    assert not torch.equal(model.generate(x, 5, temperature=5.0), greedy)


def test_bf16_autocast_keeps_the_residual_stream_in_bf16():
    """Under bf16 autocast the blocks get a bf16 residual stream; with embed_input's cast left out (as the
    fp32-residual side of benchmarks/train.py does), or under fp16, the fp32 one autocast leaves. The logits
    stay those of the fp32 model within bf16 rounding."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs.preset("tiny"))
    x = torch.randint(0, 512, (2, 16))
    seen = []
    for block in model.layers:
        block.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))

    def run(bf16_residual, dtype):
        if bf16_residual:
            model.__dict__.pop("embed_input", None)
        else:  # the embedding as autocast leaves it
            model.embed_input = lambda ids: model.drop(model.embed(ids))
        seen.clear()
        with torch.autocast("cpu", dtype=dtype):
            logits = model(x)
        return logits, set(seen)

    ref = model(x)
    out, dtypes = run(True, torch.bfloat16)
    assert dtypes == {torch.bfloat16}
    assert run(False, torch.bfloat16)[1] == {torch.float32}
    assert run(True, torch.float16)[1] == {torch.float32}
    torch.testing.assert_close(out, ref, atol=1e-2, rtol=0)
    assert not torch.equal(out, ref)


def test_loss_is_cross_entropy_with_ignored_targets():
    model = tiny()
    x, y = tokens(T=30), tokens(T=30, seed=1)
    y[:, :10] = -100
    logits = model(x)
    ref = F.cross_entropy(logits.view(-1, V), y.view(-1), ignore_index=-100)
    torch.testing.assert_close(model(x, targets=y), ref)
    torch.testing.assert_close(model(x, targets=y, reduction="sum"), ref * (y != -100).sum())
    with torch.no_grad():  # the plain chunked forward, no gradients computed
        torch.testing.assert_close(model(x, targets=y), ref)


def head_and_targets(dtype=torch.float32):
    """h (2, 30, 64) and a head weight (V, 64), both requiring grad; 15 of the 60 targets ignored (-100)."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 30, 64, generator=g).to(dtype).requires_grad_()
    w = (0.3 * torch.randn(V, 64, generator=g)).requires_grad_()
    y = torch.randint(0, V, (2, 30), generator=g)
    y[0, :10], y[1, 25:] = -100, -100
    return h, w, y


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("needs", ["both", "h", "weight"])
def test_fused_cross_entropy_matches_the_plain_head(reduction, needs):
    """chunked_cross_entropy computes dh and dW in forward, chunk by chunk (7 tokens: the last chunk of the 60
    is short): loss and gradients equal autograd through F.cross_entropy on the full fp32 logits. fp32;
    tolerance 1e-5 (abs and rel): only the order of fp32 sums differs (chunks, softmax as exp(logit - lse))."""
    h, w, y = head_and_targets()
    h.requires_grad_(needs != "weight")
    w.requires_grad_(needs != "h")
    loss = chunked_cross_entropy(h, w, y, reduction, chunk_tokens=7)
    loss.backward()
    grads = h.grad, w.grad
    h.grad = w.grad = None
    ref = F.cross_entropy(F.linear(h, w).float().view(-1, V), y.view(-1), ignore_index=-100, reduction=reduction)
    ref.backward()
    tol = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, ref, **tol)
    for ours, theirs in zip(grads, (h.grad, w.grad)):
        assert (ours is None) == (theirs is None)
        if ours is not None:
            torch.testing.assert_close(ours, theirs, **tol)
    with torch.no_grad():
        torch.testing.assert_close(chunked_cross_entropy(h, w, y, reduction, chunk_tokens=7), ref, **tol)


def test_fused_cross_entropy_under_bf16_autocast():
    """Under autocast the head GEMMs run in bf16 (the fp32 weight cast once), the softmax in fp32, and the
    gradients come back in the inputs' dtypes (bf16 h, fp32 master weight). The loss equals autograd's through
    F.linear under the same autocast; the gradients are compared with fp32 math on the bf16-rounded inputs
    (what the GEMMs see). Tolerance: bf16 rounds the logits' gradient and the GEMM outputs to 2^-8 relative,
    so 1% of the largest gradient entry."""
    h, w, y = head_and_targets(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = chunked_cross_entropy(h, w, y, chunk_tokens=7)
        ref = F.cross_entropy(F.linear(h, w).float().view(-1, V), y.view(-1), ignore_index=-100)
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    h32, w32 = h.detach().float().requires_grad_(), w.detach().bfloat16().float().requires_grad_()
    F.cross_entropy(F.linear(h32, w32).view(-1, V), y.view(-1), ignore_index=-100).backward()
    for ours, exact in ((h.grad, h32.grad), (w.grad, w32.grad)):
        torch.testing.assert_close(ours.float(), exact, atol=0.01 * exact.abs().max().item(), rtol=0)


def test_compiled_training_step_equals_eager():
    """torch.compile traces the fused cross-entropy's autograd.Function in one graph (fullgraph: no break);
    loss and every gradient equal eager's (fp32, inductor reorders sums: 1e-5 relative)."""
    model = tiny().train()
    x, y = tokens(T=30), tokens(T=30, seed=1)
    y[:, :10] = -100
    results = []
    for forward in (model, torch.compile(model, fullgraph=True)):
        model.zero_grad(set_to_none=True)
        loss = forward(x, targets=y)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss, grads), (loss_c, grads_c) = results
    torch.testing.assert_close(loss_c, loss, atol=1e-5, rtol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads_c[name], grads[name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("arch", ["llama", "neox"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_round_trip_through_transformers_is_bit_identical(tmp_path, arch, tied):
    ours = tiny(arch, tie_word_embeddings=tied, rope_scaling={"rope_type": "yarn", "factor": 2.0})
    ours.save_pretrained(tmp_path / "a")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    hf.save_pretrained(tmp_path / "b")  # transformers' own folder: its config.json, its tensors
    back = Transformer.from_pretrained(tmp_path / "b", attn_impl="eager")
    assert back.args == ours.args
    a, b = ours.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (back.output.weight is back.embed.weight) == tied


def test_tokenizer_is_copied_in(tmp_path):
    tok = tmp_path / "tokenizer.model"
    tok.write_bytes(b"not really a sentencepiece model")
    tiny().save_pretrained(tmp_path / "m", tokenizer_path=str(tok))
    assert (tmp_path / "m" / "tokenizer.model").read_bytes() == tok.read_bytes()


def test_unsupported_config_is_one_line_error(tmp_path):
    hf, folder = hf_llama(tmp_path)
    c = json.loads((folder / "config.json").read_text())
    c["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 10000.0}
    (folder / "config.json").write_text(json.dumps(c))
    with pytest.raises(SystemExit, match="rope_scaling.rope_type: unsupported 'longrope'"):
        Transformer.from_pretrained(folder)
    tiny().save_pretrained(tmp_path / "ours")
    with pytest.raises(SystemExit, match="attn_implx: not a ModelArgs field"):
        Transformer.from_pretrained(tmp_path / "ours", attn_implx="eager")


def test_overrides_and_presets():
    with pytest.raises(ValueError, match="preset"):
        ModelArgs.preset("huge")
    args = ModelArgs.preset("1.1b", attn_impl="sdpa")
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.hidden_dim) == (2048, 22, 32, 4, 5632)
    assert ModelArgs.preset("baby").hidden_dim == 1536  # llama2.c: 2/3 * 4 * 512 rounded up to 256


@pytest.mark.parametrize("preset", ["tiny", "baby", "1.1b"])
def test_num_params_equals_transformers(preset):
    args = ModelArgs.preset(preset)
    cfg = transformers.AutoConfig.for_model(**hf_config(args))
    with torch.device("meta"):
        ours, hf = Transformer(args), transformers.AutoModelForCausalLM.from_config(cfg)
    assert ours.num_params() == hf.num_parameters()
    # MFU uses the matmul parameters: 6N + 12*L*H*Q*T flops per token
    n = ours.num_params(non_embedding=True)
    assert n == ours.num_params() - args.vocab_size * args.dim
    flops = 6 * n + 12 * args.n_layers * args.dim * args.max_seq_len
    assert ours.estimate_mfu(1000.0, peak_flops=1e12) == pytest.approx(1000.0 * flops / 1e12)


@pytest.mark.skipif(A.fa4_forward_kernel is not None, reason="flash-attn-4 is installed")
def test_fa4_backend_needs_its_package_and_falls_back_where_it_cannot_run():
    cpu = torch.device("cpu")
    assert resolve_attn_impl("auto", cpu) == "sdpa"
    with pytest.raises(ValueError, match=r"attn_impl=fa4: flash-attn-4 is not installed \(pip install flash-attn-4\)"):
        tiny(attn_impl="fa4")(tokens(T=8))
    # packed documents and padding need masks that flash-attn-4 is not given: sdpa with an explicit mask
    x, doc_ids, _ = packed_row()
    assert build_attn_mask("fa4", 40, cpu, doc_ids=doc_ids)[0] == "sdpa"
    assert build_attn_mask("fa4", 40, cpu, attention_mask=torch.ones(2, 40))[0] == "sdpa"
    assert build_attn_mask("fa4", 40, cpu) == ("fa4", None)


# ----------------------------------------------------------------------------- GPU (H100)

gpu = pytest.mark.gpu


def gpu_model(arch="llama", **kw):
    torch.manual_seed(0)
    kw = {"dim": 512, "n_layers": 2, "n_heads": 8, "vocab_size": 1000, "max_seq_len": 1024, "attn_impl": "eager",
          **({"n_kv_heads": 2} if arch == "llama" else {"rotary_pct": 0.25}), **kw}
    return Transformer(ModelArgs(arch=arch, **kw)).cuda()


def needs_fa4():
    if A.fa4_forward_kernel is None:
        pytest.skip("flash-attn-4 is not installed")


@gpu
@pytest.mark.parametrize("impl", ["sdpa", "flex", "flash_attn", "fa4"])
@pytest.mark.parametrize("packed", [False, True], ids=["causal", "packed"])
@pytest.mark.parametrize("arch", ["llama", "neox"])
def test_gpu_bf16_backend_matches_fp32_eager(impl, packed, arch):
    """bf16 logits of each fast backend vs the fp32 eager reference. Tolerance: bf16 carries 8 mantissa bits
    (relative step 2^-8 = 0.004) and errors accumulate over 2 layers, so |diff| <= 0.05 + 0.02*|ref|.
    fa4 with packed documents runs its sdpa fallback."""
    if impl == "flash_attn" and A.flash_attn_func is None:  # flash-attn-4 alone also makes `flash_attn` import
        pytest.skip("flash-attn (2) is not installed")
    if impl == "fa4":
        needs_fa4()
    model = gpu_model(arch)
    x = torch.randint(3, 1000, (4, 1024), device="cuda")
    x[:, 300], x[:, 700] = 2, 2
    doc = doc_ids_from_eos(x, 2) if packed else None
    pos = position_ids_from_doc_ids(doc) if packed else None
    with torch.no_grad():
        ref = model(x, doc_ids=doc, position_ids=pos)
        model.args.attn_impl = impl
        out = model.to(torch.bfloat16)(x, doc_ids=doc, position_ids=pos)
    torch.testing.assert_close(out, ref, atol=0.05, rtol=0.02)


@gpu
@pytest.mark.parametrize("impl", ["sdpa", "flex"])
def test_gpu_backend_gradients_match_eager(impl):
    """Training path: loss and gradients of a packed batch, fp32, each backend vs eager."""
    model = gpu_model()
    x = torch.randint(3, 1000, (2, 512), device="cuda")
    x[:, 200] = 2
    doc = doc_ids_from_eos(x, 2)
    pos = position_ids_from_doc_ids(doc)
    grads = []
    for name in ["eager", impl]:
        model.zero_grad()
        model.args.attn_impl = name
        loss = model(x, targets=x.roll(-1, 1), doc_ids=doc, position_ids=pos)
        loss.backward()
        grads.append((loss.detach(), model.model.layers[0].self_attn.q_proj.weight.grad.clone()))
    torch.testing.assert_close(grads[1][0], grads[0][0], atol=1e-4, rtol=1e-4)
    # TF32/flash kernels reorder sums; gradients agree to ~1e-3 relative
    torch.testing.assert_close(grads[1][1], grads[0][1], atol=1e-4, rtol=1e-2)


@gpu
@pytest.mark.parametrize("arch", ["llama", "neox"])
def test_gpu_fa4_compiled_training_step_matches_sdpa(arch):
    """flash-attn-4 as custom ops: one graph under torch.compile(fullgraph=True), and the bf16-autocast loss and
    attention gradients of a compiled step agree with sdpa's (GQA 8 query / 2 kv heads for Llama; NeoX hands
    strided q, k, v views over its fused projection). bf16 kernels that sum in another order: gradients agree
    to ~1% relative; a wrong dq / dk / dv (or the missing causal mask) is off by far more."""
    needs_fa4()
    assert resolve_attn_impl("auto", torch.device("cuda")) == "fa4"
    model = gpu_model(arch)
    x = torch.randint(3, 1000, (2, 1024), device="cuda")
    attn = model.model.layers[0].self_attn if arch == "llama" else model.gpt_neox.layers[0].attention
    weights = [p for p in attn.parameters() if p.dim() == 2]
    losses, grads = {}, {}
    for impl in ("sdpa", "fa4"):
        model.args.attn_impl = impl
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.compile(model, fullgraph=True)(x, targets=x.roll(-1, 1))
        loss.backward()
        losses[impl], grads[impl] = loss.item(), [w.grad.clone() for w in weights]
        torch._dynamo.reset()
    assert losses["fa4"] == pytest.approx(losses["sdpa"], rel=1e-3)
    for g_fa4, g_sdpa in zip(grads["fa4"], grads["sdpa"]):
        assert (g_fa4 - g_sdpa).norm() / g_sdpa.norm() < 0.02


@gpu
def test_gpu_compiled_decode_step_matches_eager():
    """The static cache allows a compiled one-token decode step (fixed shapes, slots given as a tensor)."""
    model = gpu_model(attn_impl="sdpa").eval()
    x = torch.randint(3, 1000, (2, 16), device="cuda")
    with torch.no_grad():
        ref = model(x)
        cache = model.new_cache(2, 64)
        model(x[:, :15], cache=cache, cache_pos=torch.arange(15, device="cuda"))
        step = torch.compile(lambda t, p: model(t, cache=cache, cache_pos=p), fullgraph=True)
        out = step(x[:, 15:], torch.tensor([15], device="cuda"))
    torch.testing.assert_close(out, ref[:, 15:], atol=1e-4, rtol=1e-4)
