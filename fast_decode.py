"""The one-token decode step of a Llama as five Triton kernels per layer (CUDA only; engine.Decoder uses it).

At batch 1 a decode step reads every weight once for a single token: memory- and launch-bound. torch.compile
makes about a dozen short kernels out of a layer, so launches, not bytes, set the pace. Here a layer is
five kernels, each one pass over its weights with the small work fused in:

  1. RMSNorm + q/k/v projections           x = norm(h); qkv = [Wq; Wk; Wv] x
  2. RoPE + cache write + attention         one program per (row, head), online softmax over the cache
  3. o projection + residual                h = h + Wo a
  4. RMSNorm + gate/up + SwiGLU             m = silu(Wg norm(h)) * (Wu norm(h))
  5. down projection + residual             h = h + Wd m

plus one kernel before the layers (embedding, new cache slot, RoPE angles: prologue()) and one after
(final RMSNorm + lm_head). Values are rounded where model.py rounds them (to the weights' dtype after each
projection, norm, RoPE and activation; fp32 inside), so logits match the PyTorch step to bf16 precision
(tests/test_fast_decode.py: fp32 in Triton's interpreter on the CPU, bf16 on a GPU).
decode_step() has the contract of `model(tokens, cache=cache, cache_pos=cache_pos)[:, -1]`; engine.Decoder
records it as a CUDA graph. On Hopper each kernel starts before the previous one ends (pdl=True, see has_pdl()).
"""
import torch
import torch.nn as nn

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


# Up to this batch size engine.Decoder uses these kernels. Each program multiplies a block of weights with
# every row in fp32, without tensor cores, so at batch 8 inductor's step is faster (docs/2026-12-06-log.md).
MAX_BATCH = 4


def supported(model) -> bool:
    """Llama blocks with plain (merged, unquantized) Linear layers on a GPU: what the kernels read. Not with
    dynamic NTK scaling: its angles depend on the sequence length seen, which a recorded graph cannot follow."""
    rope = model.args.rope_scaling or {}
    if triton is None or model.args.arch != "llama" or not model.embed.weight.is_cuda or \
            rope.get("rope_type") == "dynamic":
        return False
    linears = [model.output] + [m for block in model.layers for m in (
        block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj, block.self_attn.o_proj,
        block.mlp.gate_proj, block.mlp.up_proj, block.mlp.down_proj)]
    power_of_2 = model.args.head_dim & (model.args.head_dim - 1) == 0
    return power_of_2 and all(type(m) is nn.Linear for m in linears)  # not LoRA-wrapped, not QuantLinear


if triton is not None:
    @triton.jit
    def _matvec_kernel(X, W1, W2, W3, NORM_W, RES, OUT, B, K, N, N1, N2,
                       EPS: tl.constexpr, NORM: tl.constexpr, SWIGLU: tl.constexpr, RESIDUAL: tl.constexpr,
                       BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
        # this program: outputs n0 .. n0 + BLOCK_N - 1 for every row b of X (B, K). The output rows are the
        # rows of [W1; W2; W3] stacked (N1, N2 rows of the first two); with SWIGLU, silu(W1 x) * (W2 x).
        n0 = tl.program_id(0) * BLOCK_N
        b = tl.arange(0, BLOCK_B)[:, None, None]  # (B, 1, 1)
        n = tl.arange(0, BLOCK_N)[None, :, None]  # (1, N, 1)
        k = tl.arange(0, BLOCK_K)[None, None, :]  # (1, 1, K)
        dtype = X.dtype.element_ty
        # a block of rows lies within one matrix (the caller's BLOCK_N divides N1 and N2)
        if SWIGLU:
            w1, w2 = W1 + n0 * K, W2 + n0 * K
        elif n0 < N1:
            w1, w2 = W1 + n0 * K, W1
        elif n0 < N1 + N2:
            w1, w2 = W2 + (n0 - N1) * K, W2
        else:
            w1, w2 = W3 + (n0 - N1 - N2) * K, W3
        rows = tl.arange(0, BLOCK_B)[:, None]
        cols = n0 + tl.arange(0, BLOCK_N)[None, :]
        # What does not depend on the kernel just before this one is loaded while that kernel may still be
        # running (PDL, see has_pdl() below): the first block of weights and of the norm's weight, and the
        # residual (made two or more kernels back). Then this program waits for that kernel's outputs.
        w_mask = (n0 + n < N) & (k < K)
        w = tl.load(w1 + n * K + k, mask=w_mask, other=0.0)
        if SWIGLU:
            w_up = tl.load(w2 + n * K + k, mask=w_mask, other=0.0)
        if NORM:
            norm_w = tl.load(NORM_W + k, mask=k < K, other=0.0)
        if RESIDUAL:
            res = tl.load(RES + rows * N + cols, mask=(rows < B) & (cols < N), other=0.0)
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        if NORM:  # the rms of each row first; the rows are small and are read again from cache below
            ss = tl.zeros([BLOCK_B, 1, 1], tl.float32)
            for k0 in range(0, K, BLOCK_K):
                x = tl.load(X + b * K + k0 + k, mask=(b < B) & (k0 + k < K), other=0.0).to(tl.float32)
                ss += tl.sum(x * x, axis=2, keep_dims=True)
            rstd = tl.rsqrt(ss / K + EPS)
        # products are summed elementwise across the loop and reduced over k once at the end; each step
        # loads the next block of weights before it multiplies the current one
        acc = tl.zeros([BLOCK_B, BLOCK_N, BLOCK_K], tl.float32)
        if SWIGLU:
            acc2 = tl.zeros([BLOCK_B, BLOCK_N, BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(X + b * K + k0 + k, mask=(b < B) & (k0 + k < K), other=0.0)
            if NORM:  # model.RMSNorm: weight * (x * rstd) rounded to the dtype, the product rounded again
                x = (x.to(tl.float32) * rstd).to(dtype)
                x = (x.to(tl.float32) * norm_w.to(tl.float32)).to(dtype)
                norm_w = tl.load(NORM_W + k0 + BLOCK_K + k, mask=k0 + BLOCK_K + k < K, other=0.0)
            x = x.to(tl.float32)
            w_mask = (n0 + n < N) & (k0 + BLOCK_K + k < K)  # all false past the last block: nothing read
            w_next = tl.load(w1 + n * K + k0 + BLOCK_K + k, mask=w_mask, other=0.0)
            acc += x * w.to(tl.float32)
            w = w_next
            if SWIGLU:
                w_up_next = tl.load(w2 + n * K + k0 + BLOCK_K + k, mask=w_mask, other=0.0)
                acc2 += x * w_up.to(tl.float32)
                w_up = w_up_next
        y = tl.sum(acc, axis=2).to(dtype).to(tl.float32)  # (B, N): the projection, rounded as nn.Linear's
        if SWIGLU:  # silu(g) * u, each rounded as F.silu and the product are
            up = tl.sum(acc2, axis=2).to(dtype).to(tl.float32)
            y = (y * tl.sigmoid(y)).to(dtype).to(tl.float32) * up
        if RESIDUAL:  # h + y, added in fp32 and rounded once, as torch adds two bf16 tensors
            y += res.to(tl.float32)
        tl.store(OUT + rows * N + cols, y.to(OUT.dtype.element_ty), mask=(rows < B) & (cols < N))

    @triton.jit
    def _attention_kernel(QKV, COS, SIN, KC, VC, VALID, POS, OUT, L, H: tl.constexpr, KV: tl.constexpr,
                          D: tl.constexpr, SCALE: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr):
        # this program: row b, query head h, which reads kv head j (GQA: H / KV query heads share one)
        b, h = tl.program_id(0), tl.program_id(1)
        j = h // (H // KV)
        d = tl.arange(0, D)
        # RoPE, "rotate half" layout: out_i = x_i cos_i + r_i sin_i, r = (-x[D/2:], x[:D/2]); in fp32
        partner = (d + D // 2) % D
        cos = tl.load(COS + b * D + d)
        sin = tl.load(SIN + b * D + d) * tl.where(d < D // 2, -1.0, 1.0)
        pos = tl.load(POS)
        kc, vc = KC + (b * KV + j) * L * D, VC + (b * KV + j) * L * D
        # the first block of cached slots: keys, values and which slots hold real tokens
        first = tl.arange(0, BLOCK_S)
        before = first < pos
        keys = tl.load(kc + first[:, None] * D + d[None, :], mask=before[:, None], other=0.0)
        vals = tl.load(vc + first[:, None] * D + d[None, :], mask=before[:, None], other=0.0)
        valid = tl.load(VALID + b * L + first, mask=before, other=0)
        if PDL:  # all of the above was written before the kernel just before this one; qkv comes from it
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        row = QKV + b * (H + 2 * KV) * D  # this row's [q heads | k heads | v heads]
        q = tl.load(row + h * D + d).to(tl.float32) * cos + tl.load(row + h * D + partner).to(tl.float32) * sin
        q = q.to(QKV.dtype.element_ty).to(tl.float32)
        k = tl.load(row + (H + j) * D + d).to(tl.float32) * cos + \
            tl.load(row + (H + j) * D + partner).to(tl.float32) * sin
        k = k.to(KC.dtype.element_ty)
        v = tl.load(row + (H + KV + j) * D + d).to(VC.dtype.element_ty)
        # the new key and value go to cache slot pos (written once per kv head). This step takes them from
        # registers, not back from the cache, so the loads of slots before pos need not wait for the stores.
        if h % (H // KV) == 0:
            tl.store(kc + pos * D + d, k)
            tl.store(vc + pos * D + d, v)
        # softmax(q k^T * SCALE) v over the new token and the cached slots before it that hold real tokens,
        # a block of slots at a time: the running max m rescales what was summed so far (online softmax, as
        # flash attention). It starts from the new token: m = its score, exp(score - m) = 1, sum = v.
        m = tl.sum(q * k.to(tl.float32), axis=0) * SCALE
        denom = tl.exp(m - m)
        acc = v.to(tl.float32)
        for s0 in range(0, pos, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            real = (s < pos) & (valid != 0)
            # the next block is loaded before this one is used (all false past the last: nothing read)
            ahead = s + BLOCK_S < pos
            keys_next = tl.load(kc + (s + BLOCK_S)[:, None] * D + d[None, :], mask=ahead[:, None], other=0.0)
            vals_next = tl.load(vc + (s + BLOCK_S)[:, None] * D + d[None, :], mask=ahead[:, None], other=0.0)
            valid = tl.load(VALID + b * L + s + BLOCK_S, mask=ahead, other=0)
            scores = tl.where(real, tl.sum(keys.to(tl.float32) * q[None, :], axis=1) * SCALE, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=0))
            p = tl.exp(scores - m_new)
            alpha = tl.exp(m - m_new)
            acc = acc * alpha + tl.sum(p[:, None] * vals.to(tl.float32), axis=0)
            denom = denom * alpha + tl.sum(p, axis=0)
            m = m_new
            keys, vals = keys_next, vals_next
        tl.store(OUT + (b * H + h) * D + d, (acc / denom).to(OUT.dtype.element_ty))

    @triton.jit
    def _prologue_kernel(TOKENS, TOKEN_STRIDE, EMBED, H, VALID, POS, INV_FREQ, COS, SIN, L, DIM, ATTN_FACTOR,
                         D: tl.constexpr, BLOCK_DIM: tl.constexpr, BLOCK_L: tl.constexpr, PDL: tl.constexpr):
        # row b: the new slot marked as a real token, its position (the real tokens before it, so left padding
        # is not counted), the RoPE cos / sin at that position, and the token's embedding
        b = tl.program_id(0)
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        pos = tl.load(POS)
        tl.store(VALID + b * L + pos, 1)
        seen = tl.zeros([BLOCK_L], tl.int32)
        for s0 in range(0, pos, BLOCK_L):
            s = s0 + tl.arange(0, BLOCK_L)
            seen += tl.load(VALID + b * L + s, mask=s < pos, other=0).to(tl.int32)
        position = tl.sum(seen, axis=0).to(tl.float32)
        # model.RotaryEmbedding: angle_i = position * inv_freq_i in fp32, the same angle for dims i and i + D/2
        d = tl.arange(0, D)
        angle = position * tl.load(INV_FREQ + d % (D // 2))
        tl.store(COS + b * D + d, tl.cos(angle) * ATTN_FACTOR)
        tl.store(SIN + b * D + d, tl.sin(angle) * ATTN_FACTOR)
        token = tl.load(TOKENS + b * TOKEN_STRIDE)
        for k0 in range(0, DIM, BLOCK_DIM):
            k = k0 + tl.arange(0, BLOCK_DIM)
            tl.store(H + b * DIM + k, tl.load(EMBED + token * DIM + k, mask=k < DIM), mask=k < DIM)

    @triton.jit
    def _argmax_kernel(X, OUT, PICKS, SLOT, ARRIVED, B, V, ROW_STRIDE, BLOCK: tl.constexpr, RECORD: tl.constexpr,
                       PDL: tl.constexpr):
        # row r: the index of its largest value, the first one on ties (as torch.argmax). RECORD: also
        # PICKS[slot, r] = that index, and the last row to get there moves the slot on
        r = tl.program_id(0)
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        best, best_i = float("-inf"), 0
        for v0 in range(0, V, BLOCK):
            v = v0 + tl.arange(0, BLOCK)
            x = tl.load(X + r * ROW_STRIDE + v, mask=v < V, other=float("-inf"))
            m = tl.max(x, axis=0)
            take = m > best  # strictly larger: an earlier block keeps a tie
            best_i = tl.where(take, v0 + tl.argmax(x, axis=0, tie_break_left=True), best_i)
            best = tl.where(take, m, best)
        tl.store(OUT + r, best_i)
        if RECORD:
            slot = tl.load(SLOT)
            tl.store(PICKS + slot * B + r, best_i)
            tl.debug_barrier()  # all of this program has read the slot before it counts itself in
            # ARRIVED counts the rows done; the atomic (acquire-release) orders every row's read of the slot
            # before the last row's write of it
            if tl.atomic_add(ARRIVED, 1) == B - 1:
                tl.store(SLOT, slot + 1)
                tl.store(ARRIVED, 0)


def has_pdl(x) -> bool:
    """Whether x's GPU has programmatic dependent launch (Hopper and later): a kernel may start while the one
    before it is still running, load what does not depend on it, and wait (gdc_wait) only for that kernel's
    outputs. In a chain of a hundred short kernels this hides most of each launch's gap (bench.py decode:
    ours vs ours_no_pdl). Every launcher below takes pdl=True (use it where the GPU has it) or False.
    The rules that keep it exact:
      - every program calls gdc_launch_dependents right after its wait, so a kernel starts only once all
        programs of the one before have passed their wait, i.e. once the kernel two back has finished:
        what it loads before its own wait (weights, a residual or cache slots written two or more kernels
        back) is final;
      - everything a kernel writes comes after its wait, so the kernel before it never sees its inputs
        change under it."""
    return x.is_cuda and torch.cuda.get_device_capability(x.device)[0] >= 9


def launch(pdl: bool) -> dict:
    return {"launch_pdl": True} if pdl else {}


def matvec_config(B, N, K, swiglu):
    """(BLOCK_N, BLOCK_K, num_warps), from sweeps of whole recorded steps on an H100 (350m and 1.1b presets,
    batch 1 and 4; figures/probe_h100_decode_sweep.txt): whole rows of up to 2048 columns at batch 1 (fewer
    as the batch grows), so that most weights are loaded before the wait, and ~4096 products per batch row
    in each program, which gives several thousand programs to spread the loads over the 132 SMs."""
    block_k = min(triton.next_power_of_2(K), 2048 // triton.next_power_of_2(B))
    return max(1, 4096 // (block_k * (2 if swiglu else 1))), block_k, 4


def matvec(x, weights, norm=None, residual=None, swiglu=False, out_dtype=None, pdl=True):
    """x (B, K) times the rows of `weights` stacked: (B, sum of their rows), or with swiglu the two
    matrices (gate, up) give silu(gate x) * (up x). norm: an RMSNorm applied to x first; residual: added."""
    B, K = x.shape
    pdl = pdl and has_pdl(x)
    N = weights[0].shape[0] if swiglu else sum(w.shape[0] for w in weights)
    w1, w2, w3 = (list(weights) + [weights[0]] * 2)[:3]
    out = torch.empty(B, N, dtype=out_dtype or x.dtype, device=x.device)
    block_n, block_k, warps = matvec_config(B, N, K, swiglu)
    while w1.shape[0] % block_n or w2.shape[0] % block_n:  # a block of rows must not straddle two matrices
        block_n //= 2
    _matvec_kernel[(triton.cdiv(N, block_n),)](
        x, w1, w2, w3, norm.weight if norm is not None else x, residual if residual is not None else x, out,
        B, K, N, w1.shape[0], w2.shape[0], norm.eps if norm is not None else 0.0,
        norm is not None, swiglu, residual is not None, triton.next_power_of_2(B), block_n, block_k, pdl,
        num_warps=warps, **launch(pdl))
    return out


# slots per loop step and warps of the attention kernel (two blocks of keys and values are held at once);
# of 128/4, 256/4, 256/8 and 64/2, 256/8 gave the fastest step on an H100 (figures/probe_h100_decode_sweep.txt)
ATTENTION_SLOTS, ATTENTION_WARPS = 256, 8


def attention(qkv, cos, sin, k_cache, v_cache, valid, cache_pos, n_heads, n_kv_heads, pdl=True):
    """qkv (B, (H + 2 KV) D) -> (B, H D): RoPE on q and k, k and v written to cache slot cache_pos, then
    attention over the cache slots up to cache_pos that `valid` marks as real tokens."""
    B, _, L, D = k_cache.shape
    pdl = pdl and has_pdl(qkv)
    out = torch.empty(B, n_heads * D, dtype=qkv.dtype, device=qkv.device)
    _attention_kernel[(B, n_heads)](qkv, cos, sin, k_cache, v_cache, valid, cache_pos, out, L,
                                    n_heads, n_kv_heads, D, D ** -0.5, ATTENTION_SLOTS, pdl,
                                    num_warps=ATTENTION_WARPS, **launch(pdl))
    return out


def prologue(model, tokens, cache, cache_pos, pdl=True):
    """What a step needs before the first layer, in one kernel (as model.forward's cache bookkeeping,
    model.rotary and model.embed): the slot cache_pos marked valid; the embeddings h (B, dim) of tokens
    (B, 1); cos, sin (B, head_dim) fp32."""
    B, dim, D = tokens.shape[0], model.args.dim, model.args.head_dim
    h = torch.empty(B, dim, dtype=model.embed.weight.dtype, device=tokens.device)
    pdl = pdl and has_pdl(h)
    cos, sin = (torch.empty(B, D, dtype=torch.float32, device=tokens.device) for _ in range(2))
    _prologue_kernel[(B,)](tokens, tokens.stride(0), model.embed.weight, h, cache.valid, cache_pos,
                           model.rotary.inv_freq, cos, sin, cache.max_len, dim, model.rotary.attn_factor, D, 1024,
                           1024, pdl, num_warps=4, **launch(pdl))
    return h, cos, sin


def decode_step(model, tokens, cache, cache_pos, pdl=True):
    """Logits (B, vocab) fp32 of one new token per row (tokens (B, 1)), written to cache slot cache_pos:
    `model(tokens, cache=cache, cache_pos=cache_pos)[:, -1]` in Triton kernels."""
    args = model.args
    h, cos, sin = prologue(model, tokens, cache, cache_pos, pdl)
    for i, block in enumerate(model.layers):
        attn, mlp = block.self_attn, block.mlp
        qkv = matvec(h, (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight), norm=block.input_layernorm,
                     pdl=pdl)
        a = attention(qkv, cos, sin, cache.k[i], cache.v[i], cache.valid, cache_pos, args.n_heads, args.n_kv_heads,
                      pdl)
        h = matvec(a, (attn.o_proj.weight,), residual=h, pdl=pdl)
        m = matvec(h, (mlp.gate_proj.weight, mlp.up_proj.weight), norm=block.post_attention_layernorm, swiglu=True,
                   pdl=pdl)
        h = matvec(m, (mlp.down_proj.weight,), residual=h, pdl=pdl)
    return matvec(h, (model.output.weight,), norm=model.final_norm, out_dtype=torch.float32, pdl=pdl)


def argmax(logits, out=None, record=None, pdl=True):
    """logits (B, V) -> (B,) int64, as logits.argmax(-1): greedy decoding's pick, one Triton program per row
    with 16 warps reading it in 16k blocks. engine.Decoder's recorded greedy step passes `out`, the next
    step's token buffer, and record = (picks (slots, B), slot (1,), arrived (1,) int32 zero): the kernel also
    writes picks[slot] and adds one to slot, so the next replay can follow with nothing in between."""
    B, V = logits.shape
    pdl = pdl and has_pdl(logits)
    assert logits.stride(1) == 1, "argmax: rows must be contiguous"
    out = torch.empty(B, dtype=torch.long, device=logits.device) if out is None else out
    picks, slot, arrived = record or (out, out, out)  # unused without record
    _argmax_kernel[(B,)](logits, out, picks, slot, arrived, B, V, logits.stride(0),
                         min(16384, triton.next_power_of_2(V)), RECORD=record is not None, PDL=pdl,
                         num_warps=16, **launch(pdl))
    return out
