"""Attention backends on packed rows (document masks), forward and forward+backward, on a GPU.

Each row of the batch packs 4 documents; attention must stay inside a document. Compared:
  sdpa_mask   torch sdpa with an explicit (B, 1, T, T) boolean mask (what most training code does)
  flex        FlexAttention with a block mask (skips fully masked tiles)
  flash_varlen flash-attn's varlen kernel over cu_seqlens (only if flash_attn imports)
  causal      dense causal sdpa (flash kernel), which ignores the documents: the usual baseline
Then the whole model (forward+backward with loss) per backend, beside transformers' LlamaForCausalLM.

    python bench.py attn --seq 2048 4096 --batch 8 --heads 16 --head_dim 64

Prints `name: value` lines (milliseconds per call: --iters calls back to back, median of 5 such runs).
"""
import torch

from benchmarks.common import cuda_time_ms, peak_gib, require_cuda, reset_peak
from attention import attention, build_attn_mask, flash_attn_func, position_ids_from_doc_ids
from checkpoint import hf_config
from model import ModelArgs, Transformer


def packed_doc_ids(B, T, n_docs, device, seed=0):
    """(B, T) document index per token: n_docs documents per row with random lengths."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(B):
        cuts = torch.sort(torch.randperm(T - 1, generator=g)[:n_docs - 1] + 1).values
        lengths = torch.diff(torch.cat([torch.tensor([0]), cuts, torch.tensor([T])]))
        rows.append(torch.repeat_interleave(torch.arange(n_docs), lengths))
    return torch.stack(rows).to(device)


def bench_kernels(a, T):
    dev = "cuda"
    q, k, v = (torch.randn(a.batch, a.heads, T, a.head_dim, device=dev, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    doc_ids = packed_doc_ids(a.batch, T, a.docs, dev)
    impls = ["sdpa", "flex"] + (["flash_attn"] if flash_attn_func is not None else [])
    names = {"sdpa": "sdpa_mask", "flex": "flex", "flash_attn": "flash_varlen"}
    cases = {names[i]: (i, build_attn_mask(i, T, dev, doc_ids=doc_ids)[1]) for i in impls}
    cases["causal"] = ("sdpa", None)
    grad = torch.randn_like(q)
    for name, (impl, mask) in cases.items():
        def fwd():
            with torch.no_grad():
                attention(q, k, v, impl, mask)

        def fwd_bwd():
            attention(q, k, v, impl, mask).backward(grad)

        print(f"attn_T{T}_{name}_fwd_ms: {cuda_time_ms(fwd, a.warmup, a.iters):.3f}")
        print(f"attn_T{T}_{name}_fwd_bwd_ms: {cuda_time_ms(fwd_bwd, a.warmup, a.iters):.3f}")
    # building the block mask is part of every flex training step (the documents change per batch)
    print(f"attn_T{T}_flex_block_mask_build_ms: "
          f"{cuda_time_ms(lambda: build_attn_mask('flex', T, dev, doc_ids=doc_ids), a.warmup, a.iters):.3f}")


def bench_model(a, T):
    """Whole model forward+backward (loss) on packed rows, per backend, and transformers' Llama (dense causal:
    it has no document mask for sdpa) on the same config and weights."""
    import transformers
    dev = "cuda"
    args = ModelArgs(dim=a.model_dim, n_layers=a.model_layers, n_heads=a.model_dim // a.head_dim,
                     vocab_size=32000, max_seq_len=T)
    model = Transformer(args).to(dev, torch.bfloat16)
    x = torch.randint(0, args.vocab_size, (a.model_batch, T), device=dev)
    doc_ids = packed_doc_ids(a.model_batch, T, a.docs, dev)
    pos = position_ids_from_doc_ids(doc_ids)
    impls = ["sdpa", "flex"] + (["flash_attn"] if flash_attn_func is not None else [])
    for impl in impls:
        model.args.attn_impl = impl

        def step():
            model(x, targets=x, doc_ids=doc_ids, position_ids=pos).backward()

        reset_peak()
        print(f"model_T{T}_{impl}_packed_fwd_bwd_ms: {cuda_time_ms(step, a.warmup, a.iters):.3f}")
        print(f"model_T{T}_{impl}_packed_peak_mem_gb: {peak_gib():.2f}")
    model.args.attn_impl = "sdpa"
    reset_peak()
    print(f"model_T{T}_sdpa_causal_fwd_bwd_ms: "
          f"{cuda_time_ms(lambda: model(x, targets=x).backward(), a.warmup, a.iters):.3f}")
    print(f"model_T{T}_sdpa_causal_peak_mem_gb: {peak_gib():.2f}")
    cfg = transformers.AutoConfig.for_model(**hf_config(args))
    hf = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").to(dev, torch.bfloat16)
    hf.load_state_dict(model.state_dict())
    del model  # peak memory below is transformers' alone
    reset_peak()
    print(f"model_T{T}_hf_sdpa_causal_fwd_bwd_ms: "
          f"{cuda_time_ms(lambda: hf(x, labels=x).loss.backward(), a.warmup, a.iters):.3f}")
    print(f"model_T{T}_hf_sdpa_causal_peak_mem_gb: {peak_gib():.2f}")
    del hf
    reset_peak()


def run(args):
    require_cuda("attn")
    print(f"device: {torch.cuda.get_device_name()}")
    print(f"shape: B={args.batch} H={args.heads} D={args.head_dim} docs/row={args.docs} bf16")
    for T in args.seq:
        bench_kernels(args, T)
    if args.model_layers > 0:
        for T in args.seq:
            bench_model(args, T)


def add_args(p):
    p.add_argument("--seq", type=int, nargs="+", default=[2048, 4096], help="sequence lengths to time")
    p.add_argument("--batch", type=int, default=8, help="rows per batch (kernel benchmark)")
    p.add_argument("--heads", type=int, default=16, help="attention heads (kernel benchmark)")
    p.add_argument("--head_dim", type=int, default=64, help="head dimension")
    p.add_argument("--docs", type=int, default=4, help="documents packed into each row")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls before timing (compiles flex)")
    p.add_argument("--iters", type=int, default=20, help="calls timed back to back per run (5 runs, median printed)")
    p.add_argument("--model_dim", type=int, default=1024, help="whole-model benchmark: width")
    p.add_argument("--model_layers", type=int, default=4, help="whole-model benchmark: layers (0 skips it)")
    p.add_argument("--model_batch", type=int, default=4, help="whole-model benchmark: rows per batch")
    return p

