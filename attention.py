"""Attention backends behind one call, and the masks they need.

  attention(q, k, v, impl, mask)   softmax(q k^T / sqrt(D) + mask) v with one of ATTN_IMPLS:
      eager       the plain math, the readable reference
      sdpa        torch's scaled_dot_product_attention (flash / cuDNN kernels on a GPU)
      flex        FlexAttention: block-sparse document masks compiled into one kernel
      flash_attn  the flash-attn package (varlen for packed rows)
      fa4         flash-attn-4 (CuTe DSL kernels, Hopper and newer), wrapped as torch custom ops
  build_attn_mask   the mask of one forward, in the form its backend takes (or a fallback to sdpa)
  resolve_attn_impl what "auto" means on this device
  doc_ids_from_eos / position_ids_from_doc_ids   packed documents (reset_mask / reset_position_ids)
"""
import math

import torch
import torch.nn.functional as F

try:  # FlexAttention: block-sparse masks compiled into one kernel (torch >= 2.5)
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:
    flex_attention = None

try:  # the flash-attn package (FlashAttention-2), used only when it imports
    from flash_attn import flash_attn_func, flash_attn_varlen_func
except ImportError:
    flash_attn_func = None

try:  # flash-attn-4 (CuTe DSL kernels for Hopper and Blackwell GPUs), used only when it imports
    from flash_attn.cute.interface import _flash_attn_bwd as fa4_backward_kernel, _flash_attn_fwd as fa4_forward_kernel
except (ImportError, OSError):
    fa4_forward_kernel = None

ATTN_IMPLS = ("auto", "eager", "sdpa", "flex", "flash_attn", "fa4")

# ----------------------------------------------------------------------------- attention

def resolve_attn_impl(impl: str, device: torch.device, packed=False) -> str:
    """auto on a GPU: flash-attn-4 for plain causal rows on Hopper or newer when installed (the fastest causal
    kernel there); else flash_attn if installed; else FlexAttention for packed documents (it skips the
    masked-out blocks) and sdpa (its cuDNN / flash kernels) for plain rows. sdpa on CPU."""
    hopper = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9
    packages = {"flash_attn": (flash_attn_func, "flash-attn"), "fa4": (fa4_forward_kernel, "flash-attn-4")}
    if impl in packages:
        kernel, package = packages[impl]
        if kernel is None:
            raise ValueError(f"attn_impl={impl}: {package} is not installed (pip install {package})")
        if device.type != "cuda" or (impl == "fa4" and not hopper):
            raise ValueError(f"attn_impl={impl}: {package} needs an NVIDIA GPU"
                             + (" of compute capability 9.0 or newer (H100, B200)" if impl == "fa4" else ""))
    if impl != "auto":
        return impl
    if device.type == "cuda":
        if not packed and fa4_forward_kernel is not None and hopper:
            return "fa4"
        if flash_attn_func is not None:
            return "flash_attn"
        if packed and flex_attention is not None:
            return "flex"
    return "sdpa"


_compiled_flex = None


def _flex(q, k, v, block_mask):
    """FlexAttention must be compiled to be fast (and memory-light) on a GPU; eager is the CPU reference."""
    global _compiled_flex
    if q.is_cuda:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        return _compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=k.shape[1] != q.shape[1])
    return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=k.shape[1] != q.shape[1])


# flash-attn-4's kernels are CuTe DSL programs that torch.compile cannot trace. Registered as custom ops, with a
# shape-only ("fake") version for tracing and the backward kernel as their gradient, a compiled model keeps one
# graph around them. Layout (B, T, H, D), the projections' own: no transposes in or out, forward or backward.
if fa4_forward_kernel is not None:
    @torch.library.custom_op("llm::fa4_causal", mutates_args=(), device_types="cuda")
    def fa4_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal attention; returns the output and the row log-sum-exp the backward needs."""
        out, lse = fa4_forward_kernel(q, k, v, causal=True, return_lse=True)[:2]
        return out, lse

    @fa4_causal.register_fake
    def _(q, k, v):
        B, T, H, _ = q.shape
        return q.new_empty(B, T, H, v.shape[-1]), q.new_empty(B, H, T, dtype=torch.float32)

    @torch.library.custom_op("llm::fa4_causal_backward", mutates_args=(), device_types="cuda")
    def fa4_causal_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dq, dk, dv = fa4_backward_kernel(q, k, v, out, dout, lse, causal=True)
        return dq, dk, dv

    @fa4_causal_backward.register_fake
    def _(dout, q, k, v, out, lse):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def _fa4_save(ctx, inputs, output):
        ctx.save_for_backward(*inputs, *output)

    def _fa4_grad(ctx, dout, dlse):  # dlse: nothing downstream uses the log-sum-exp
        return fa4_causal_backward(dout.contiguous(), *ctx.saved_tensors)

    fa4_causal.register_autograd(_fa4_grad, setup_context=_fa4_save)


def repeat_kv(x, n_rep):
    """(B, Hkv, S, D) -> (B, Hkv*n_rep, S, D): each kv head serves n_rep query heads (GQA)."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def attention(q, k, v, impl, mask, dropout_p=0.0):
    """softmax(q k^T / sqrt(D) + mask) v.  q: (B, H, T, D); k, v: (B, Hkv, S, D) -> (B, H, T, D).
    `mask` is what `build_attn_mask` made for this backend: None (plain causal), a bool tensor
    (B, 1, T, S) with True = may attend, a flex BlockMask, or flash_attn's (cu_seqlens, max_len)."""
    n_rep = q.shape[1] // k.shape[1]
    if impl == "fa4" and (dropout_p > 0 or q.dtype not in (torch.bfloat16, torch.float16)):
        impl = "sdpa"  # flash-attn-4 has no dropout and no fp32 kernels
    if impl == "eager":  # the readable reference
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        if mask is None:
            T, S = q.shape[2], k.shape[2]
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = F.dropout(F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), dropout_p)
        return probs @ v
    if impl == "sdpa":
        if mask is None:  # flash / cuDNN kernels take GQA directly
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p,
                                                  enable_gqa=n_rep > 1)
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    if impl == "flex":
        return _flex(q, k, v, mask)
    if impl == "flash_attn":  # works in (B, T, H, D)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if mask is None:
            y = flash_attn_func(q, k, v, dropout_p=dropout_p, causal=True)
        else:  # packed documents: every document is its own causal sequence in the flattened batch
            cu_seqlens, max_len = mask
            B, T, H, D = q.shape
            y = flash_attn_varlen_func(q.reshape(B * T, H, D), k.reshape(B * T, -1, D), v.reshape(B * T, -1, D),
                                       cu_seqlens, cu_seqlens, max_len, max_len, dropout_p=dropout_p, causal=True)
            y = y.view(B, T, H, D)
        return y.transpose(1, 2)
    if impl == "fa4":  # GQA as is: kv heads are shared by their query heads inside the kernel
        # back to (B, T, H, D): for Llama views of contiguous projections, so contiguous() copies nothing
        q, k, v = (x.transpose(1, 2).contiguous() for x in (q, k, v))
        return fa4_causal(q, k, v)[0].transpose(1, 2)
    raise ValueError(f"attn_impl: unknown backend {impl!r}")


def build_attn_mask(impl, T, device, doc_ids=None, attention_mask=None, cache=None, cache_pos=None):
    """Make the mask once per forward; every layer uses it. Returns (impl, mask): a backend that cannot
    express the mask (flex/flash_attn with padding or a KV cache, fa4 with anything but plain causal rows)
    falls back to sdpa with an explicit mask."""
    explicit = "eager" if impl == "eager" else "sdpa"  # the backends that take any bool mask
    if cache is not None:
        # query at cache slot p sees slots <= p that hold real tokens (left padding is not real), and
        # always itself so that a padding query has a finite softmax. Static shape (B, 1, T, max_len).
        slots = torch.arange(cache.max_len, device=device)
        seen = slots[None, :] <= cache_pos[:, None]  # (T, max_len)
        own = slots[None, :] == cache_pos[:, None]
        mask = seen[None] & (cache.valid[:, None, :] | own[None])
        return explicit, mask[:, None]
    if attention_mask is not None:  # padding in a plain forward
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        eye = torch.eye(T, dtype=torch.bool, device=device)
        mask = causal[None] & (attention_mask.bool()[:, None, :] | eye[None])
        if doc_ids is not None:
            mask = mask & (doc_ids[:, :, None] == doc_ids[:, None, :])
        return explicit, mask[:, None]
    if doc_ids is None:
        if impl == "flex":
            return impl, _causal_block_mask(T, str(device))
        return impl, None
    # packed documents (reset_mask): causal within a document, nothing across documents
    if impl == "flex":
        def document_causal(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])
        # _compile: on a GPU the compiled builder takes well under a millisecond instead of several
        return impl, create_block_mask(document_causal, doc_ids.shape[0], None, T, T, device=device,
                                       _compile=doc_ids.is_cuda)
    if impl == "flash_attn":
        # a sequence starts at every row start and wherever doc_ids changes; offsets into the flattened batch
        flat = doc_ids.reshape(-1)
        starts = torch.ones_like(flat, dtype=torch.bool)
        starts[1:] = flat[1:] != flat[:-1]
        starts[::T] = True
        start_idx = starts.nonzero().flatten()
        cu_seqlens = torch.cat([start_idx, start_idx.new_tensor([flat.numel()])]).to(torch.int32)
        return impl, (cu_seqlens, int((cu_seqlens[1:] - cu_seqlens[:-1]).max()))
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    mask = causal[None] & (doc_ids[:, :, None] == doc_ids[:, None, :])
    return explicit, mask[:, None]


_causal_block_masks = {}


def _causal_block_mask(T, device):
    if (T, device) not in _causal_block_masks:
        _causal_block_masks[(T, device)] = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, T, T,
                                                             device=device)
    return _causal_block_masks[(T, device)]


def doc_ids_from_eos(input_ids, eos_id):
    """Document index of every token in a packed row; the EOS that ends a document still belongs to it."""
    is_eos = (input_ids == eos_id).long()
    return torch.cumsum(is_eos, dim=-1) - is_eos


def position_ids_from_doc_ids(doc_ids):
    """Positions restart at 0 at the first token of every document (reset_position_ids)."""
    T = doc_ids.shape[-1]
    idx = torch.arange(T, device=doc_ids.device).expand_as(doc_ids)
    new_doc = torch.ones_like(doc_ids, dtype=torch.bool)
    new_doc[..., 1:] = doc_ids[..., 1:] != doc_ids[..., :-1]
    doc_start = torch.cummax(torch.where(new_doc, idx, torch.zeros_like(idx)), dim=-1).values
    return idx - doc_start
