"""fine_tuning.py: LoRA adapters that peft loads onto transformers' model, frozen base, loss on replies only,
global-batch token normalisation, SFT that learns, exact resume. Tiny model + tokenizer built here."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

import fine_tuning
import lora
import trainer
from model import ModelArgs, Transformer

STEPS = ["--batch_size", "4", "--grad_accum", "1", "--warmup_steps", "0", "--log_interval", "1",
         "--eval_iters", "2", "--tensorboard", "False", "--device", "cpu", "--dtype", "float32"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """chatterbot dialogues (the default SFT data) -> tiny sentencepiece -> SFT files; a tiny random base."""
    import dataset_sft
    from tokenizer import Tokenizer
    from train_tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("ft")
    jsonl = str(d / "chat.jsonl")
    dataset_sft.convert_chatterbot(jsonl, ["english"])
    with open(jsonl) as f:
        samples = [json.loads(line) for line in f][:600]
    with open(jsonl, "w") as f:
        f.writelines(json.dumps(s) + "\n" for s in samples)
    with open(d / "text.txt", "w") as f:
        f.writelines(t["value"] + "\n" for s in samples for t in s["conversations"])
    tok_path = train_tokenizer([str(d / "text.txt")], str(d / "tok"), vocab_size=400, num_threads=1, hf_files=False)
    dataset_sft.prepare([jsonl], tok_path, str(d / "sft"), val_ratio=0.1, workers=1, progress=False)
    tok = Tokenizer(tok_path)
    torch.manual_seed(0)
    args = ModelArgs.preset("tiny", vocab_size=tok.vocab_size, max_seq_len=64, bos_id=tok.bos_id,
                            eos_id=tok.eos_id, pad_id=tok.pad_id, attn_impl="eager")
    base = str(d / "base")
    Transformer(args).save_pretrained(base, tokenizer_path=tok_path)
    return {"dir": d, "base": base, "tok": tok, "samples": samples,
            "train": str(d / "sft_train"), "val": str(d / "sft_val")}


def run(env, out, *extra):
    """fine_tuning.main in this process (trainer.py's process group state is per process, set up once)."""
    argv = ["--init_from", env["base"], "--train_data", env["train"], "--val_data", env["val"],
            "--out_dir", str(out), *STEPS, *extra]
    return fine_tuning.main(argv)


def our_lora_model(env, adapter_dir):
    model = Transformer.from_pretrained(env["base"])
    peft_model = lora.add_lora(model, env["base"], 4, 8, 0.0)
    lora.load_adapter(peft_model, adapter_dir)
    return model.eval()


def test_adapter_loads_in_peft_on_transformers_and_merge_matches(env, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    run(env, out, "--lora", "True", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0",
        "--max_steps", "3", "--lr", "1e-2", "--eval_interval", "0", "--merge", "True")
    assert sorted(f for f in os.listdir(out) if f.startswith("adapter")) == ["adapter_config.json",
                                                                              "adapter_model.safetensors"]
    cfg = json.load(open(out / "adapter_config.json"))
    assert cfg["task_type"] == "CAUSAL_LM" and cfg["base_model_name_or_path"] == os.path.abspath(env["base"])
    assert not os.path.exists(out / "model.safetensors")  # adapter only

    x = torch.randint(0, env["tok"].vocab_size, (2, 24))
    ours = our_lora_model(env, out)
    with torch.no_grad():
        logits = ours(x)
        base_logits = Transformer.from_pretrained(env["base"])(x)
    assert (logits - base_logits).abs().max() > 1e-3  # the adapter trained (B != 0), so the test can fail

    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(env["base"]), str(out)).eval()
    with torch.no_grad():
        hf_logits = hf(input_ids=x).logits
    torch.testing.assert_close(hf_logits, logits, atol=1e-4, rtol=1e-4)

    merged = Transformer.from_pretrained(str(out / "merged")).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(x), logits, atol=1e-4, rtol=1e-4)
    assert os.path.exists(out / "merged" / "tokenizer.model")


def build(env, out, *extra):
    """What fine_tuning.main builds, kept in hand: args, LoRA model, data."""
    args = fine_tuning.get_parser().parse_args(
        ["--init_from", env["base"], "--train_data", env["train"], "--out_dir", str(out), *STEPS, *extra])
    model, peft_model = lora.build_model(args, torch.device("cpu"))
    data = fine_tuning.SFTBatches(env["train"], 64, "packing", args.batch_size * args.grad_accum, args.seed,
                                  env["tok"].vocab_size, env["tok"].file_hash)
    return args, model, peft_model, data


def test_only_adapter_parameters_train(env, tmp_path):
    args, model, peft_model, data = build(env, tmp_path, "--lora", "True", "--lora_r", "4", "--max_steps", "3",
                                          "--lr", "1e-2", "--save_interval", "0")
    a = model.args
    # r * (in + out) per adapted Linear: q, o (dim x dim), k, v (dim x kv_dim), gate, up, down (dim x hidden)
    kv = a.n_kv_heads * a.head_dim
    per_layer = 4 * (2 * (a.dim + a.dim) + 2 * (a.dim + kv) + 3 * (a.dim + a.hidden_dim))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == a.n_layers * per_layer
    assert all("lora_A" in n or "lora_B" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train(args, model, data, None, save_model=lambda m, f, t: lora.save_adapter(peft_model, f),
                  load_model=lambda m, f: lora.load_adapter(peft_model, f))
    for n, p in model.named_parameters():
        if n in trainable:
            continue
        assert torch.equal(p, before[n]), n  # base weights bit-identical
    assert any(not torch.equal(p, before[n]) for n, p in trainable.items())


def test_loss_counts_reply_tokens_only(env):
    """Targets are -100 exactly where render_chat's mask says prompt; changing the targets of prompt
    positions does not change the loss, changing the first reply token's does."""
    import dataset_sft
    from tokens import is_val_doc
    data = fine_tuning.SFTBatches(env["train"], 64, "padding", 1, 0, env["tok"].vocab_size, env["tok"].file_hash,
                                  shuffle=False)
    # a training sample that fits a row whole, rendered independently from its messages
    train_samples = [s for i, s in enumerate(env["samples"]) if not is_val_doc(i, 0.1)]
    for j, sample in enumerate(train_samples):
        r_ids, r_mask = dataset_sft.render_chat(env["tok"], dataset_sft.to_messages(sample))
        if len(r_ids) < 64 and len(sample["conversations"]) > 2:
            break
    n = len(r_ids)
    row = data.get_batch(0, [int((data.ds.kept == j).nonzero()[0][0])])  # padding, no shuffle: row k = kept[k]
    ids, targets = row["input_ids"][0], row["targets"][0]
    assert ids[:n].tolist() == r_ids
    want = [r_ids[t + 1] if r_mask[t + 1] else -100 for t in range(n - 1)]
    assert targets[:n - 1].tolist() == want and (targets[n - 1:] == -100).all()

    torch.manual_seed(0)
    model = Transformer.from_pretrained(env["base"]).eval()
    with torch.no_grad():
        loss = model(ids[None], targets=targets[None])
        # reference: cross-entropy of the logits at the trained positions only
        logits = model(ids[None])[0, : n - 1]
        trained = torch.tensor(r_mask[1:]).bool()
        ref = F.cross_entropy(logits[trained], torch.tensor(r_ids[1:])[trained])
        torch.testing.assert_close(loss, ref)
        # labels of prompt positions (any value, as a model trained on prompts would see them) do not count:
        # the loss over the same masked targets built from perturbed labels is unchanged
        labels = torch.tensor(r_ids[1:])
        perturbed = torch.where(trained, labels, torch.randint(0, env["tok"].vocab_size, labels.shape))
        t2 = targets.clone()
        t2[: n - 1] = torch.where(trained, perturbed, torch.full_like(perturbed, -100))
        assert torch.equal(model(ids[None], targets=t2[None]), loss)
        first_reply = int(trained.nonzero()[0])
        t3 = targets.clone()
        t3[first_reply] = (t3[first_reply] + 1) % env["tok"].vocab_size
        assert not torch.allclose(model(ids[None], targets=t3[None]), loss)


def test_global_batch_loss_normalisation(env, tmp_path):
    """grad_accum=2 x batch_size=1 with unequal trained-token counts: the gradient is that of the mean over
    all trained tokens of both rows (one batch of 2), not the mean of the two per-row means."""
    args, model, peft_model, data = build(env, tmp_path, "--lora", "True", "--lora_dropout", "0",
                                          "--batch_size", "1", "--grad_accum", "2", "--grad_clip", "0",
                                          "--max_steps", "1", "--save_interval", "0")
    with torch.no_grad():  # B = 0 at init makes some grads degenerate; give the adapter a random start
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    batch = data.get_batch(0, range(2))
    counts = (batch["targets"] != -100).sum(1)
    assert counts[0] != counts[1]
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(loss):
        return [g.clone() for g in torch.autograd.grad(loss, params)]

    ref_loss = model(**batch)  # reduction="mean" over every trained token of the 2 rows
    ref = grads(ref_loss)
    mean_of_means = grads(sum(model(**{k: v[i:i + 1] for k, v in batch.items()}) for i in range(2)) / 2)
    t = trainer.Trainer(args, model, data)
    seen = {}
    step = t.optimizer_step

    def capture(loss):
        seen["loss"], seen["grads"] = loss, [p.grad.clone() for p in params]
        return step(loss)

    t.optimizer_step = capture
    t.train_step()
    assert abs(seen["loss"] - float(ref_loss)) < 1e-5
    for g, r in zip(seen["grads"], ref):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-4)
    assert any(not torch.allclose(g, m, atol=1e-6, rtol=1e-4) for g, m in zip(seen["grads"], mean_of_means))


def base_val_loss(env, rows):
    model = Transformer.from_pretrained(env["base"]).eval()
    data = fine_tuning.SFTBatches(env["val"], 64, "packing", 1, 1337, env["tok"].vocab_size, env["tok"].file_hash,
                                  shuffle=False)
    batch = data.get_batch(0, range(rows))
    with torch.no_grad():
        return float(model(**batch, reduction="sum")) / int((batch["targets"] != -100).sum())


def test_sft_lowers_validation_loss(env, tmp_path):
    result = run(env, tmp_path / "full", "--max_steps", "30", "--lr", "5e-3", "--eval_interval", "0",
                 "--save_interval", "0")
    before = base_val_loss(env, 2 * 4)  # eval_iters * batch_size rows of the val data, as the trainer evaluates
    assert result["val_loss"] < before - 0.5, (before, result["val_loss"])
    # out_dir is a full checkpoint folder
    assert os.path.exists(tmp_path / "full" / "model.safetensors")


def test_lora_resume_is_exact(env, tmp_path):
    from safetensors.torch import load_file
    # a fixed schedule (decay over 4 steps), so stopping at 2 and resuming is the same run as 4 in one go
    lora = ["--lora", "True", "--lora_r", "4", "--lr", "1e-2", "--lr_decay_steps", "4", "--save_interval", "2",
            "--eval_interval", "0"]
    run(env, tmp_path / "a", *lora, "--max_steps", "4")
    run(env, tmp_path / "b", *lora, "--max_steps", "2")
    run(env, tmp_path / "b", *lora, "--max_steps", "4", "--resume", "True")
    a = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def s2_reference(q, k, v, G):
    """Dense attention under the LongLoRA mask written out per position: plain heads (the first half) see
    their group p // G, shifted heads the group (p + G/2) // G, both causal. Returns (output, plain causal)."""
    H, T, D = q.shape[1], q.shape[2], q.shape[3]
    p = torch.arange(T)
    causal = p[:, None] >= p[None, :]
    masks = [causal & ((p[:, None] + off) // G == (p[None, :] + off) // G) for off in (0, G // 2)]
    kr, vr = (x.repeat_interleave(H // k.shape[1], dim=1) for x in (k, v))
    scores = q @ kr.transpose(-1, -2) / D ** 0.5
    head_mask = torch.stack([masks[h >= H // 2] for h in range(H)])  # (H, T, T)
    full = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ vr
    return scores.masked_fill(~head_mask, float("-inf")).softmax(-1) @ vr, full


def qkv(n_kv_heads, T, requires_grad=False):
    torch.manual_seed(0)
    B, H, D = 2, 4, 8
    return (torch.randn(B, H, T, D, requires_grad=requires_grad),
            *(torch.randn(B, n_kv_heads, T, D, requires_grad=requires_grad) for _ in range(2)))


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
@pytest.mark.parametrize("impl", ["eager", "sdpa", "flex"])
@pytest.mark.parametrize("T,G", [(32, 8), (16, 16)])  # G = T: no full shifted group, two halves only
def test_s2_attention_matches_masked_reference(n_kv_heads, impl, T, G):
    """S2-Attn (causal calls per group, no mask) == dense attention under the LongLoRA mask, MHA and GQA."""
    q, k, v = qkv(n_kv_heads, T)
    y = lora.s2_attention(q, k, v, impl, group_size=G)
    ref, full = s2_reference(q, k, v, G)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(y, full, atol=1e-3)  # and it is not plain causal attention (the test can fail)


@pytest.mark.parametrize("n_kv_heads", [4, 2])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_s2_attention_gradients_match_reference(n_kv_heads, impl):
    """Backward through the groups, slices and concatenations gives the dense reference's gradients."""
    q, k, v = qkv(n_kv_heads, 32, requires_grad=True)
    w = torch.randn(2, 4, 32, 8)  # a loss that weighs every output element differently
    (lora.s2_attention(q, k, v, impl, group_size=8) * w).sum().backward()
    grads = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    (s2_reference(q, k, v, 8)[0] * w).sum().backward()
    for got, x in zip(grads, (q, k, v)):
        assert got.abs().sum() > 0
        torch.testing.assert_close(got, x.grad, atol=1e-5, rtol=1e-5)


def test_s2_attention_calls_causal_sdpa_without_mask(monkeypatch):
    """Mask-free: every sdpa call is plain causal (what the flash / cuDNN kernels take), one per group length
    and half: plain groups, shifted full groups, the two shifted half groups."""
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kw):
        calls.append((q.shape, attn_mask, is_causal))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    lora.s2_attention(*qkv(2, 32), "sdpa", group_size=8)
    assert calls == [
        (torch.Size([8, 2, 8, 8]), None, True), (torch.Size([4, 2, 4, 8]), None, True),
        (torch.Size([6, 2, 8, 8]), None, True)]


def test_long_context_yarn_and_s2_attn(env, tmp_path):
    """2x the trained length with YaRN keeps the base's length as YaRN's L0; S2-Attn changes training
    forwards only, and a LoRA run with both trains end to end."""
    model = lora.load_base(env["base"], 128, {"rope_type": "yarn", "factor": 2}, "eager")
    assert model.args.max_seq_len == 128 and model.args.rope_scaling["original_max_position_embeddings"] == 64
    if not any(hasattr(m, "train_attn_fn") for m in model.modules()):
        pytest.skip("model.py's Attention has no train_attn_fn hook yet")
    x = torch.randint(0, env["tok"].vocab_size, (2, 128))
    with torch.no_grad():
        plain_eval, plain_train = model.eval()(x), model.train()(x)
        lora.enable_s2_attn(model, 32)
        torch.testing.assert_close(model.eval()(x), plain_eval)
        assert not torch.allclose(model.train()(x), plain_train, atol=1e-4)
    result = run(env, tmp_path / "long", "--lora", "True", "--max_steps", "2", "--max_seq_len", "128",
                 "--rope_scaling", '{"rope_type": "yarn", "factor": 2}', "--s2_attn", "True",
                 "--sft_mode", "padding", "--eval_interval", "0", "--merge", "True")
    assert result["step"] == 2
    merged = json.load(open(tmp_path / "long" / "merged" / "config.json"))
    assert merged["max_position_embeddings"] == 128 and merged["rope_scaling"]["rope_type"] == "yarn"
