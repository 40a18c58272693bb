"""fast_decode.py's Triton kernels against the model's own decode step. On the CPU they run in Triton's
interpreter (TRITON_INTERPRET=1, set before triton is imported, hence a subprocess); on a GPU compiled, inside
engine.Decoder's CUDA graph (tests/test_eval.py::test_compiled_decode_matches_eager_on_gpu)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# fp32 on the CPU: the kernels round where the model rounds, so the step must agree to fp32 precision
INTERPRETED = textwrap.dedent("""
    import torch
    import fast_decode
    from model import ModelArgs, Transformer

    torch.manual_seed(0)
    default_config = fast_decode.matvec_config
    yarn = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64}
    # the last two also walk their loops in several steps: the attention over the cache 4 or 2 slots at a
    # time, the projections 32 columns at a time
    for n_kv_heads, rope_scaling, slots, small in [(4, None, 128, False), (2, yarn, 4, True), (1, None, 2, True)]:
        fast_decode.ATTENTION_SLOTS = slots
        fast_decode.matvec_config = (lambda B, N, K, swiglu: (4, 32, 4)) if small else default_config
        args = ModelArgs.preset("tiny", n_kv_heads=n_kv_heads, rope_scaling=rope_scaling)
        model = Transformer(args).eval()
        for name, p in model.named_parameters():  # norms start at ones: make their weights matter
            if "norm" in name:
                p.data.uniform_(0.5, 1.5)
        B, T = 3, 6
        ids = torch.randint(4, args.vocab_size, (B, T))
        mask = torch.ones(B, T, dtype=torch.long)
        mask[1, :2] = 0  # left padding: those slots must not be attended to
        mask[2, :5] = 0
        ours, ref = model.new_cache(B, 16), model.new_cache(B, 16)
        with torch.no_grad():
            for cache in (ours, ref):
                model(ids, attention_mask=mask, cache=cache, cache_pos=torch.arange(T))
            tokens = ids[:, -1:]
            for step in range(3):
                slot = torch.tensor([T + step])
                expected = model(tokens, cache=ref, cache_pos=slot)[:, -1]
                got = fast_decode.decode_step(model, tokens, ours, slot)
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
                for a, b in zip(ours.k + ours.v + [ours.valid], ref.k + ref.v + [ref.valid]):
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
                tokens = expected.argmax(-1, keepdim=True)
    # greedy picks: the first index on ties, rows longer than one block (vocabularies past 16k)
    x = torch.randn(3, 40000)
    x[1, 7] = x[1, 39000] = x[1].max() + 1
    x[2, 20000] = x[2, 30000] = x[2].max() + 1
    assert fast_decode.argmax(x).tolist() == x.argmax(-1).tolist() == [x[0].argmax().item(), 7, 20000]
    # as recorded in engine.Decoder's greedy step: the picks also go to picks[slot], and the slot moves on
    out, picks, slot = torch.zeros(3, 1, dtype=torch.long), torch.zeros(8, 3, dtype=torch.long), torch.tensor([5])
    arrived = torch.zeros(1, dtype=torch.int32)
    for step in range(2):
        fast_decode.argmax(x, out=out, record=(picks, slot, arrived))
        assert out[:, 0].tolist() == picks[5 + step].tolist() == x.argmax(-1).tolist()
        assert slot.item() == 6 + step and arrived.item() == 0
    assert not picks[:5].any() and not picks[7:].any()
    print("ok")
""")


def test_kernels_equal_the_model_step_in_the_triton_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": REPO}
    out = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_only_plain_llama_weights_on_a_gpu_take_the_kernels():
    import fast_decode
    from model import ModelArgs, Transformer
    llama = Transformer(ModelArgs.preset("tiny"))
    others = [Transformer(ModelArgs.preset("tiny", arch="neox", n_kv_heads=4)),
              Transformer(ModelArgs.preset("tiny", rope_scaling={"rope_type": "dynamic", "factor": 2.0}))]
    assert not fast_decode.supported(llama)  # on the CPU: the interpreter is for tests only
    if torch.cuda.is_available():
        assert fast_decode.supported(llama.cuda()) == (fast_decode.triton is not None)
        assert not any(fast_decode.supported(m.cuda()) for m in others)


@pytest.mark.gpu
def test_kernels_match_the_model_step_in_bf16_on_gpu():
    import fast_decode
    from model import ModelArgs, Transformer
    torch.manual_seed(0)
    model = Transformer(ModelArgs.preset("baby", n_kv_heads=2, vocab_size=4096)).to("cuda", torch.bfloat16).eval()
    B, T = 2, 12
    ids = torch.randint(4, 4096, (B, T), device="cuda")
    ours, ref = model.new_cache(B, 64), model.new_cache(B, 64)
    with torch.no_grad():
        for cache in (ours, ref):
            model(ids, cache=cache, cache_pos=torch.arange(T, device="cuda"))
        for step in range(4):
            slot = torch.tensor([T + step], device="cuda")
            expected = model(ids[:, -1:], cache=ref, cache_pos=slot)[:, -1]
            got = fast_decode.decode_step(model, ids[:, -1:], ours, slot)
            # bf16: the kernels sum in another order than cuBLAS; a few bf16 steps of the logits' scale
            assert (got - expected).abs().max() <= 0.03 * expected.abs().max()


@pytest.mark.gpu
def test_argmax_equals_torch_on_gpu():
    import fast_decode
    x = torch.randn(4, 32000, device="cuda")
    x[1, 5] = x[1, 31000] = x[1].max() + 1  # ties across blocks and within one: the first index wins
    x[2, 17000] = x[2, 17001] = x[2].max() + 1
    assert torch.equal(fast_decode.argmax(x), x.argmax(-1))
