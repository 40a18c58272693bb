"""eval.py and its library (engine.py, scoring.py) against transformers: greedy and beam-search ids equal
`generate` on the exported model, the logits processors equal transformers' on the same logits, perplexity
equals the one computed from transformers' logits; plus the engine against model.generate, sampling, stop
rules, batching, LoRA loading and the CLI end to end."""
import argparse
import collections
import inspect
import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dataset_sft
import engine
import eval as ev
import fast_decode
import scoring
from data_process import process
from model import ModelArgs, Transformer, sample
from tokenizer import Tokenizer
from tokens import TokenFileWriter
from train_tokenizer import train_tokenizer

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.generation.logits_process import (  # noqa: E402
    NoBadWordsLogitsProcessor, RepetitionPenaltyLogitsProcessor, TopKLogitsWarper, TopPLogitsWarper)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAD, BOS, EOS = 0, 2, 3  # train_tokenizer's special ids


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny random Llama saved with a tiny sentencepiece tokenizer, and the same folder loaded by transformers."""
    root = tmp_path_factory.mktemp("eval")
    corpus = root / "corpus.txt"
    # some stdlib source as a corpus: varied text, no download
    text = "\n".join(inspect.getsource(m) for m in (argparse, collections, json.decoder, textwrap))
    corpus.write_text(text + "\n你好，世界。今天天气很好。我们一起去公园散步吧。\n" * 20, encoding="utf-8")
    tok_path = train_tokenizer([str(corpus)], out_dir=str(root / "tok"), vocab_size=512, hf_files=False, num_threads=1)
    torch.manual_seed(0)
    model = Transformer(ModelArgs.preset("tiny", attn_impl="eager", bos_id=BOS, eos_id=EOS, pad_id=PAD)).eval()
    with torch.no_grad():  # sharper next-token distributions than the 0.02-std init: fewer near-ties
        model.lm_head.weight.mul_(20)
    folder = str(root / "model")
    model.save_pretrained(folder, tokenizer_path=tok_path)
    hf = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    return dict(root=root, folder=folder, model=model, hf=hf, tok=Tokenizer(folder), corpus=str(corpus))


def ours(ckpt, prompts, **kw):
    cfg = engine.GenerationConfig(**{"stop_ids": [EOS], **kw})
    return engine.generate(engine.Decoder(ckpt["model"]), prompts, cfg, PAD, ckpt["tok"])


def hf_new_ids(ckpt, prompt, **kw):
    out = ckpt["hf"].generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              do_sample=False, pad_token_id=PAD, **{"eos_token_id": EOS, **kw})
    return out[0, len(prompt):].tolist()


PROMPTS = [[BOS, 5, 9, 100, 7], [BOS, 300, 301], [BOS, 42, 17, 250, 251, 252, 11, 12]]


def test_chat_uses_the_one_template():
    assert ev.render_chat is dataset_sft.render_chat


def test_greedy_matches_transformers(ckpt):
    for p in PROMPTS:
        assert ours(ckpt, [p], max_new_tokens=24)[0] == hf_new_ids(ckpt, p, max_new_tokens=24)


@pytest.mark.parametrize("early_stopping,length_penalty", [(False, 1.0), (True, 0.5), ("never", 2.0), (False, -1.0)])
def test_beam_search_matches_transformers(ckpt, early_stopping, length_penalty):
    for p in PROMPTS[:2]:
        # make beams end at different lengths: the stop token is one the model likes to emit here
        eos = ours(ckpt, [p], max_new_tokens=4, stop_ids=[])[0][2]
        kw = dict(max_new_tokens=8, num_beams=3, length_penalty=length_penalty, early_stopping=early_stopping)
        assert ours(ckpt, [p], stop_ids=[eos], **kw)[0] == hf_new_ids(ckpt, p, eos_token_id=eos, **kw)


def test_repetition_penalty_matches_transformers(ckpt):
    torch.manual_seed(1)
    logits, history = torch.randn(4, 50) * 3, torch.randint(0, 50, (4, 12))
    expected = RepetitionPenaltyLogitsProcessor(1.3)(history, logits.clone())
    torch.testing.assert_close(engine.apply_repetition_penalty(logits, history, 1.3), expected, rtol=0, atol=0)
    # and inside generation
    p = PROMPTS[0]
    assert ours(ckpt, [p], max_new_tokens=20, repetition_penalty=1.5)[0] == \
        hf_new_ids(ckpt, p, max_new_tokens=20, repetition_penalty=1.5)


def test_bad_words_match_transformers(ckpt):
    torch.manual_seed(2)
    logits = torch.randn(3, 30)
    history = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8], [9, 7, 8, 1]])
    bad = [[11], [7, 8, 12], [4, 13], [2, 2, 14]]  # row 1 ends with 7 8 -> 12 banned; row 0 ends with 4 -> 13
    expected = NoBadWordsLogitsProcessor(bad, eos_token_id=EOS)(history, logits.clone())
    got = engine.apply_bad_words(logits, history, bad)
    assert torch.equal(torch.isinf(got), torch.isinf(expected)) and torch.isinf(got).sum() == 3 + 2
    # in generation: the greedy continuation's 2nd token and a two-token word ending in its 5th are banned
    p = PROMPTS[0]
    free = ours(ckpt, [p], max_new_tokens=12)[0]
    bad = [[free[1]], free[3:5]]
    got = ours(ckpt, [p], max_new_tokens=12, bad_words_ids=bad)[0]
    assert got == hf_new_ids(ckpt, p, max_new_tokens=12, bad_words_ids=bad)
    assert free[1] not in got and all(got[i:i + 2] != free[3:5] for i in range(len(got)))


def test_top_k_top_p_keep_exactly_the_right_tokens():
    probs = torch.tensor([[0.05, 0.4, 0.02, 0.25, 0.15, 0.1, 0.03]])
    logits = probs.log()
    cases = [(dict(top_k=3), {1, 3, 4}), (dict(top_p=0.6), {1, 3}), (dict(top_p=0.75), {1, 3, 4}),
             (dict(top_k=2, top_p=0.99), {1, 3}), (dict(top_p=0.35), {1})]
    for kw, expected in cases:
        hf = logits.clone()  # transformers applies top-k, then top-p
        if "top_k" in kw:
            hf = TopKLogitsWarper(kw["top_k"])(None, hf)
        if "top_p" in kw:
            hf = TopPLogitsWarper(kw["top_p"])(None, hf)
        assert set(torch.isfinite(hf[0]).nonzero().flatten().tolist()) == expected
        torch.manual_seed(0)
        drawn = sample(logits.expand(4000, -1), temperature=1.0, **kw)
        assert set(drawn.tolist()) == expected, kw  # every kept token shows up (p >= 0.1 each), no other does


def test_sampling_is_reproducible_with_a_seed(ckpt):
    kw = dict(max_new_tokens=16, temperature=1.0, top_k=100, top_p=0.95, stop_ids=[])
    runs = []
    for seed in (123, 123, 124):
        assert engine.request_seed(seed) == seed
        runs.append(ours(ckpt, PROMPTS[:2], **kw))
    assert runs[0] == runs[1] and runs[0] != runs[2]
    assert engine.request_seed(None) != engine.request_seed(None)  # a fresh seed per request


def test_stop_tokens_and_stop_strings(ckpt):
    tok = ckpt["tok"]
    p = [BOS] + tok.encode("def parse(")
    free = ours(ckpt, [p], max_new_tokens=30, stop_ids=[])[0]
    # stop token: output ends right at its first occurrence, kept as the last id
    stop = free[6]
    got = ours(ckpt, [p], max_new_tokens=30, stop_ids=[stop])[0]
    assert got == free[:free.index(stop) + 1]
    # stop string: a piece of the free text that starts after its 5th token; generation ends with the first
    # token whose text contains it and the text is cut where it starts
    text = tok.decode(free)
    start = len(tok.decode(free[:5]))
    s = text[start:start + 3]
    assert s.strip(), text
    cfg = engine.GenerationConfig(max_new_tokens=30, stop_strings=[s])
    got = engine.generate(engine.Decoder(ckpt["model"]), [p], cfg, PAD, tok)[0]
    n = next(i for i in range(1, len(free) + 1) if s in tok.decode(free[:i]))
    assert got == free[:n]
    assert engine.finish_text(tok, got, cfg) == text[:text.index(s)]


def test_streamer_prints_exactly_the_final_text(ckpt):
    import io
    tok = ckpt["tok"]
    ids = tok.encode("hello world, 你好世界 END here")
    out = io.StringIO()
    st = engine.Streamer(tok, ["END"], out)
    for i in range(1, len(ids) + 1):
        st.put(ids[:i])
        assert "\ufffd" not in out.getvalue() and "E" not in out.getvalue()
    st.put(ids, final=True)
    assert out.getvalue() == "hello world, 你好世界 "


def test_engine_equals_the_reference_loop(ckpt):
    """engine.generate gives model.generate's ids (the plain reference loop): a left-padded batch, greedy and
    sampled with one seed. model.generate pads a row after its EOS; the engine ends the row at its EOS."""
    ids, mask = engine.left_pad(PROMPTS, PAD)
    for kw in (dict(), dict(temperature=1.0, top_k=50)):
        torch.manual_seed(5)
        ref = ckpt["model"].generate(ids, 12, attention_mask=mask, eos_id=EOS, **kw)[:, ids.shape[1]:].tolist()
        torch.manual_seed(5)
        got = ours(ckpt, PROMPTS, max_new_tokens=12, **kw)
        assert got == [r[:r.index(EOS) + 1] if EOS in r else r for r in ref], kw


def test_batched_equals_one_by_one(ckpt):
    for kw in (dict(max_new_tokens=16), dict(max_new_tokens=16, repetition_penalty=1.3), dict(max_new_tokens=8, num_beams=3)):
        assert ours(ckpt, PROMPTS, **kw) == [ours(ckpt, [p], **kw)[0] for p in PROMPTS], kw


def hf_token_nlls(hf, ids):
    """-log p(ids[t+1] | ids[:t+1]) for every t, from transformers' logits."""
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].float()
    return F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="none")


def test_perplexity_equals_transformers_loss(ckpt):
    torch.manual_seed(3)
    tokens = np.random.default_rng(0).integers(4, 512, size=150).astype(np.uint16)
    seq_len = 32
    nll, n = scoring.perplexity(ckpt["model"], tokens, seq_len, batch_size=2)
    # transformers' loss per window (mean over its len-1 predictions), token-weighted over the windows
    total, count = 0.0, 0
    for b in range(0, len(tokens), seq_len):
        w = torch.tensor(tokens[b:b + seq_len].astype(np.int64))[None]
        if w.shape[1] < 2:
            continue
        with torch.no_grad():
            loss = ckpt["hf"](w, labels=w).loss.item()
        total, count = total + loss * (w.shape[1] - 1), count + w.shape[1] - 1
    assert n == count == 150 - 5  # 5 windows, the first token of each is not predicted
    assert math.exp(nll / n) == pytest.approx(math.exp(total / count), rel=1e-5)


def test_sliding_window_perplexity_by_hand(ckpt):
    tokens = np.random.default_rng(1).integers(4, 512, size=100).astype(np.uint16)
    seq_len, stride = 32, 12
    nll, n = scoring.perplexity(ckpt["model"], tokens, seq_len, stride=stride, batch_size=3)
    # HF's recipe by hand: windows [begin, begin+32) every 12 tokens; only tokens past the previous
    # window's end are scored, each conditioned on everything before it in its window
    total, scored, prev_end = 0.0, [], 1
    for begin in range(0, len(tokens), stride):
        end = min(begin + seq_len, len(tokens))
        nlls = hf_token_nlls(ckpt["hf"], tokens[begin:end].astype(np.int64).tolist())
        for target in range(prev_end, end):
            total += nlls[target - begin - 1].item()
            scored.append(target)
        prev_end = end
        if end == len(tokens):
            break
    assert scored == list(range(1, 100)) and n == 99
    assert nll == pytest.approx(total, rel=1e-5)


def test_lora_adapter_is_merged(ckpt, tmp_path):
    from peft import LoraConfig, get_peft_model
    base = Transformer.from_pretrained(ckpt["folder"]).eval()
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"],
                     init_lora_weights=False)  # random B: the adapter really changes the outputs
    peft_model = get_peft_model(base, cfg).eval()
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    x = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        expected = peft_model(x)
        merged = engine.load_model(ckpt["folder"], adapter=str(tmp_path / "adapter"))
        torch.testing.assert_close(merged(x), expected, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(ckpt["model"](x), expected, atol=1e-3)
    assert isinstance(merged, Transformer)


def test_mc_accuracy_by_option_loglik(ckpt):
    tok = ckpt["tok"]
    items = [("What is 2+2?", ["four", "five", "six", "seven"], 0), ("Capital?", ["Paris", "Rome", "def", "import"], 2),
             ("你好", ["世界", "公园", "天气", "散步"], 1)]
    fmt = "{question}\n答案："
    acc, _ = scoring.mc_accuracy(ckpt["model"], tok, items, fmt)
    hits = 0
    for q, options, answer in items:
        context = [BOS] + tok.encode(fmt.format(question=q))
        ll = [-hf_token_nlls(ckpt["hf"], context + tok.encode(o))[len(context) - 1:].sum().item() for o in options]
        hits += int(np.argmax(ll) == answer)
    assert acc == hits / len(items)


def values(stdout):
    return dict(l.split(": ", 1) for l in stdout.splitlines() if ": " in l)


def test_cli_ppl_and_mismatched_token_file(ckpt, capsys):
    root, folder = ckpt["root"], ckpt["folder"]
    process([ckpt["corpus"]], folder, str(root / "data" / "x"), val_ratio=0.2, progress=False)
    ev.main(["ppl", "--model", folder, "--data", str(root / "data" / "x_val.bin"), "--max_tokens", "300",
             "--stride", "64", "--max_seq_len", "96", "--rope_scaling", '{"rope_type":"yarn","factor":2}'])
    v = values(capsys.readouterr().out)
    assert float(v["ppl"]) > 1 and float(v["bpb"]) > 0 and int(v["tokens"]) == 299 and v["seq_len"] == "96"
    # a token file from another tokenizer is refused with a one-line reason
    with TokenFileWriter(str(root / "data" / "other"), np.uint16, dict(vocab_size=512, tokenizer_hash="0" * 16)) as w:
        w.write(np.arange(100) % 512)
    with pytest.raises(SystemExit, match="tokenizer"):
        ev.main(["ppl", "--model", folder, "--data", str(root / "data" / "other.bin")])


def test_cli_generate(ckpt, tmp_path, capsys):
    folder = ckpt["folder"]
    ev.main(["generate", "--model", folder, "--prompt", "def f(", "--max_new_tokens", "8", "--seed", "7",
             "--temperature", "0.8", "--top_p", "0.9", "--repetition_penalty", "1.1"])
    out = capsys.readouterr().out
    assert values(out)["seed"] == "7" and out.splitlines()[1].startswith("def f(")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def f(\nclass A:\n你好\n", encoding="utf-8")
    ev.main(["generate", "--model", folder, "--prompt_file", str(prompts), "--max_new_tokens", "6",
             "--num_beams", "2", "--bad_words", '["the"]', "--stop_strings", '["\\n\\n"]'])
    v = values(capsys.readouterr().out)
    assert json.loads(v["output_2"]).startswith("你好") and "output_3" not in v and int(v["new_tokens"]) > 0
    with pytest.raises(SystemExit, match="--stop_strings"):
        ev.main(["generate", "--model", folder, "--prompt", "x", "--stop_strings", "[oops"])


def test_cli_chat_script(ckpt):
    """`python eval.py chat` driven through stdin, as run.sh does."""
    turns = "hello\nhow are you\n/reset\nagain\n/exit\nnever read\n"
    r = subprocess.run([sys.executable, os.path.join(REPO, "eval.py"), "chat", "--model", ckpt["folder"],
                        "--max_new_tokens", "5", "--system", "be brief"], capture_output=True, text=True,
                       input=turns, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [l.split(":")[0] for l in lines] == ["user", "assistant", "user", "assistant", "reset", "user", "assistant"]
    assert all(isinstance(json.loads(l.split(": ", 1)[1]), str) for l in lines if l.startswith("assistant"))
    assert "never read" not in r.stdout


def test_chat_prompt_is_render_chat(ckpt, monkeypatch):
    """The chat loop sends exactly render_chat(..., add_generation_prompt=True) of the conversation so far."""
    import io
    seen = []
    real = ev.generate  # chat finds generate in eval's namespace

    def spy(decoder, prompts, cfg, *a, **kw):
        seen.append(prompts[0])
        return real(decoder, prompts, cfg, *a, **kw)

    monkeypatch.setattr(ev, "generate", spy)
    tok, out = ckpt["tok"], io.StringIO()
    cfg = engine.GenerationConfig(max_new_tokens=4, stop_ids=[EOS])
    ev.chat(engine.Decoder(ckpt["model"]), tok, cfg, ["hi", "more"], out=out)
    reply = json.loads(out.getvalue().splitlines()[1].removeprefix("assistant: "))
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": reply}, {"role": "user", "content": "more"}]
    assert seen[1] == dataset_sft.render_chat(tok, msgs, add_generation_prompt=True)[0]
    assert tok.token_id("<|end|>") in cfg.stop_ids


@torch.no_grad()
def test_compiled_prompt_pass_takes_any_length(ckpt):
    """Decoder compiles the prompt pass without fixing its length: dynamo specialises on the first prompt
    length, compiles one graph with a symbolic length at the second, and reuses it for every later one.
    torch's counting backend (eager kernels) stands in for inductor, so this runs on CPU."""
    from torch._dynamo.testing import CompileCounter
    model = ckpt["model"]
    dec, ref, counter = engine.Decoder(model), engine.Decoder(model), CompileCounter()
    torch._dynamo.reset()
    dec._compiled_prefill = torch.compile(dec._prefill, backend=counter)
    for T in (5, 9, 13, 30):
        ids = torch.randint(4, 100, (2, T))
        mask = torch.ones_like(ids)
        mask[0, :3] = 0  # left padding
        torch.testing.assert_close(dec.prefill(ids, mask, 8)[0], ref.prefill(ids, mask, 8)[0])
    assert counter.frame_count == 2
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.parametrize("kernels", [True, False])
def test_compiled_decode_matches_eager_on_gpu(ckpt, kernels):
    # fp32: in bf16 the fused kernels round differently and a random model's near-ties flip greedy picks.
    # kernels: fast_decode's Triton step in a CUDA graph; else the model's forward under torch.compile
    model = Transformer.from_pretrained(ckpt["folder"]).cuda().eval()
    cfg = engine.GenerationConfig(max_new_tokens=32, stop_ids=[])
    eager = engine.generate(engine.Decoder(model), PROMPTS, cfg, PAD)
    dec = engine.Decoder(model, compile=True, kernels=kernels)
    assert dec.compiled and dec.kernels == kernels and len(PROMPTS) <= fast_decode.MAX_BATCH
    for _ in range(2):  # the 2nd run replays the recorded CUDA graph
        assert engine.generate(dec, PROMPTS, cfg, PAD) == eager
    # greedy with the kernels picks inside the recorded step (Decoder.greedy_steps): rows stopping early;
    # with a repetition penalty the picks stay outside (Decoder.step)
    for extra in ({"stop_ids": [eager[1][5], eager[2][20]]}, {"repetition_penalty": 1.3}):
        cfg = engine.GenerationConfig(max_new_tokens=32, **{"stop_ids": [], **extra})
        assert engine.generate(dec, PROMPTS, cfg, PAD) == engine.generate(engine.Decoder(model), PROMPTS, cfg, PAD)
