"""The model: Llama and GPT-NeoX in one readable file, weight-for-weight the same as Hugging Face's.

Parameter names and layouts equal transformers' LlamaForCausalLM / GPTNeoXForCausalLM, so a folder
written by `save_pretrained` loads in `AutoModelForCausalLM.from_pretrained` with the same logits
(tests/test_model.py proves it against transformers). Read top to bottom:

  ModelArgs      the hyperparameters (+ named presets)
  RoPE           rotary position embedding and its scalings (linear, ntk, dynamic, yarn, llama3)
  attention      one function, five backends (eager, sdpa, flex, flash_attn, fa4) + the masks they need
  KVCache        static preallocated cache for incremental decoding (gpt-fast style)
  blocks         Llama (RMSNorm, SwiGLU) and NeoX (LayerNorm, GELU, parallel residual) layers
  Transformer    forward (logits or chunked loss), generate, save/load in the HF folder format
"""
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
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

ROPE_TYPES = ("default", "linear", "ntk", "dynamic", "yarn", "llama3")
ATTN_IMPLS = ("auto", "eager", "sdpa", "flex", "flash_attn", "fa4")


# ----------------------------------------------------------------------------- hyperparameters

@dataclass
class ModelArgs:
    arch: str = "llama"  # "llama" | "neox"
    dim: int = 288
    n_layers: int = 6
    n_heads: int = 6
    n_kv_heads: int | None = None  # < n_heads: grouped-query attention (1: multi-query); llama only
    vocab_size: int = 32000
    hidden_dim: int | None = None  # MLP width (HF intermediate_size); None: derived from dim
    multiple_of: int = 256  # llama's derived hidden_dim is rounded up to a multiple of this
    norm_eps: float = 1e-5
    max_seq_len: int = 512  # trained context (HF max_position_embeddings)
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # HF semantics: {"rope_type": "linear"|"ntk"|"dynamic"|"yarn"|"llama3", "factor": ..}
    rotary_pct: float = 1.0  # neox: fraction of each head that is rotated (HF partial_rotary_factor)
    use_parallel_residual: bool = True  # neox: x + attn(ln1(x)) + mlp(ln2(x))
    tie_word_embeddings: bool = False
    dropout: float = 0.0
    attn_impl: str = "auto"  # one of ATTN_IMPLS
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = 0

    def __post_init__(self):
        if self.arch not in ("llama", "neox"):
            raise ValueError(f"arch: unknown architecture {self.arch!r} (llama | neox)")
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl: unknown backend {self.attn_impl!r} ({' | '.join(ATTN_IMPLS)})")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads/n_kv_heads: dim {self.dim}, n_heads {self.n_heads} and "
                             f"n_kv_heads {self.n_kv_heads} must divide evenly")
        if self.arch == "neox" and self.n_kv_heads != self.n_heads:
            raise ValueError("n_kv_heads: GPT-NeoX has no grouped-query attention")
        if self.arch == "llama" and self.rotary_pct != 1.0:
            raise ValueError("rotary_pct: Llama rotates the whole head (partial rotary is neox only)")
        if self.hidden_dim is None:
            if self.arch == "neox":
                self.hidden_dim = 4 * self.dim
            else:  # SwiGLU has 3 matrices: 2/3 of 4*dim keeps the parameter count of a 4*dim GELU MLP
                h = int(2 * 4 * self.dim / 3)
                self.hidden_dim = self.multiple_of * ((h + self.multiple_of - 1) // self.multiple_of)
        if self.rope_scaling is not None:
            self.rope_scaling = normalize_rope_scaling(self.rope_scaling, self.max_seq_len)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelArgs":
        if name not in PRESETS:
            raise ValueError(f"preset: unknown {name!r} (one of {', '.join(PRESETS)})")
        return cls(**{**PRESETS[name], **overrides})


PRESETS = {
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, hidden_dim=160, max_seq_len=128),
    "baby": dict(dim=512, n_layers=8, n_heads=8, max_seq_len=512),  # baby-llama2-chinese
    "350m": dict(dim=1024, n_layers=24, n_heads=16, max_seq_len=1024),
    "1.1b": dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, hidden_dim=5632, max_seq_len=2048),  # TinyLlama
}


def normalize_rope_scaling(rs: dict, max_seq_len: int) -> dict:
    """Validate an HF-style rope scaling dict (legacy key "type" accepted) and fill defaults."""
    rs = dict(rs)
    rope_type = rs.pop("type", None) or rs.get("rope_type", "default")
    rs["rope_type"] = rope_type
    rs.pop("rope_theta", None)  # lives in ModelArgs.rope_theta
    rs.pop("partial_rotary_factor", None)  # lives in ModelArgs.rotary_pct
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_scaling.rope_type: unsupported {rope_type!r} (supported: {', '.join(ROPE_TYPES)})")
    if rope_type == "default":
        return None
    need = {"llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
    for key in need.get(rope_type, ("factor",)):
        if rs.get(key) is None:
            raise ValueError(f"rope_scaling.{key}: required for rope_type {rope_type!r}")
    if rope_type == "yarn":  # as transformers: the pre-extension length defaults to max_position_embeddings
        rs.setdefault("original_max_position_embeddings", max_seq_len)
    return rs


# ----------------------------------------------------------------------------- RoPE

def rope_inv_freq(args: ModelArgs, seq_len=None):
    """Inverse frequencies theta_i = base^(-2i/d), i < d/2, after rope scaling, and the attention factor
    that multiplies cos/sin (YaRN's temperature; 1 otherwise). Always fp32. d = rotated dims per head.
    seq_len (a tensor) is only used by dynamic NTK."""
    d = int(args.head_dim * args.rotary_pct)
    base = args.rope_theta
    rs = args.rope_scaling or {"rope_type": "default"}
    kind = rs["rope_type"]
    exponent = torch.arange(0, d, 2, dtype=torch.int64).float() / d

    if kind == "ntk":
        # NTK-aware (fixed alpha): stretch the base so the lowest frequency is interpolated by alpha
        # while the highest is untouched: base' = base * alpha^(d/(d-2))
        base = base * rs["factor"] ** (d / (d - 2))
    if kind == "dynamic":
        # dynamic NTK: the NTK base grows with the current length L once L exceeds the trained length L0:
        # base' = base * (factor*L/L0 - (factor-1))^(d/(d-2)), L = max(L, L0)   (recomputed every call)
        L0 = args.max_seq_len
        L = torch.clamp(seq_len.float(), min=L0) if seq_len is not None else torch.tensor(float(L0))
        base = base * (rs["factor"] * L / L0 - (rs["factor"] - 1)) ** (d / (d - 2))
        return 1.0 / (base ** exponent.to(L.device)), 1.0
    inv_freq = 1.0 / (base ** exponent)

    if kind == "linear":
        # position interpolation: position m becomes m/factor, i.e. theta_i / factor
        inv_freq = inv_freq / rs["factor"]
    elif kind == "yarn":
        # YaRN = NTK-by-parts + temperature. A dim with wavelength 2*pi/theta_i that completes more than
        # beta_fast rotations within L0 is kept (extrapolated), fewer than beta_slow is interpolated
        # (theta_i/factor), a linear ramp in between. Attention logits are scaled by mscale^2 through
        # cos/sin, mscale = 0.1*ln(factor) + 1 (or the ratio with mscale/mscale_all_dim, DeepSeek style).
        factor, L0 = rs["factor"], rs["original_max_position_embeddings"]
        beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

        def dim_of(rotations):  # the dim index whose wavelength fits `rotations` times into L0
            return d * math.log(L0 / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = dim_of(beta_fast), dim_of(beta_slow)
        if rs.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, d - 1)
        if low == high:
            high += 0.001  # avoid dividing by zero
        ramp = torch.clamp((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)

        def mscale_of(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attn_factor = rs.get("attention_factor")
        if attn_factor is None:
            if rs.get("mscale") and rs.get("mscale_all_dim"):
                attn_factor = mscale_of(factor, rs["mscale"]) / mscale_of(factor, rs["mscale_all_dim"])
            else:
                attn_factor = mscale_of(factor)
        return inv_freq, float(attn_factor)
    elif kind == "llama3":
        # Llama 3.1: wavelengths longer than L0/low_freq_factor are interpolated (theta/factor), shorter than
        # L0/high_freq_factor kept, in between a smooth mix s*theta + (1-s)*theta/factor, s = (L0/wavelen - lo)/(hi - lo)
        factor, lo, hi, L0 = (rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"],
                              rs["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        smooth = (L0 / wavelen - lo) / (hi - lo)
        mixed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > L0 / lo, inv_freq / factor, torch.where(wavelen < L0 / hi, inv_freq, mixed))
    return inv_freq, 1.0


class RotaryEmbedding(nn.Module):
    """cos/sin of the angles m * theta_i in the HF "rotate-half" layout: dims (i, i + d/2) form a pair.

    Positions below max_seq_len read fp32 tables made once. Computed inside a compiled model instead, cos and
    sin are fused into every layer's RoPE kernel, forward and backward, and evaluated again for each element
    of every head: those kernels took 7.2 ms of a 222 ms training micro-step at 1.1B. Dynamic NTK rescales
    with the length, so it always computes."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.dynamic = bool(args.rope_scaling) and args.rope_scaling["rope_type"] == "dynamic"
        inv_freq, self.attn_factor = rope_inv_freq(args)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._make_tables()

    def _make_tables(self):
        positions = torch.arange(0 if self.dynamic else self.args.max_seq_len, device=self.inv_freq.device)
        cos, sin = self._cos_sin(positions, self.inv_freq)
        self.register_buffer("cos_table", cos, persistent=False)
        self.register_buffer("sin_table", sin, persistent=False)

    def _apply(self, fn, recurse=True):
        # model.to(bf16) casts every float buffer: remake the tables in fp32, from inv_freq as the computed
        # path sees it, so that both paths agree in any dtype (and on a device after to_empty)
        super()._apply(fn, recurse)
        self._make_tables()
        return self

    def _cos_sin(self, position_ids, inv_freq):
        angles = position_ids[..., None].float() * inv_freq.float()  # (..., d/2), fp32 whatever the dtype
        emb = torch.cat((angles, angles), dim=-1)
        return emb.cos() * self.attn_factor, emb.sin() * self.attn_factor

    def forward(self, position_ids, max_pos):
        """max_pos: a bound on the positions known from shapes alone (T without a KV cache, its length with one)."""
        if max_pos <= len(self.cos_table):
            return self.cos_table[position_ids], self.sin_table[position_ids]
        inv_freq = self.inv_freq
        if self.dynamic:
            inv_freq, _ = rope_inv_freq(self.args, seq_len=position_ids.max() + 1)
            inv_freq = inv_freq.to(position_ids.device)
        return self._cos_sin(position_ids, inv_freq)


def apply_rope(x, cos, sin):
    """x: (B, T, heads, head_dim), the layout the projections produce; cos, sin: (B, T, d).
    Rotate the first d dims: x*cos + rotate_half(x)*sin, in fp32 (the rest, NeoX's partial rotary, passes)."""
    d = cos.shape[-1]
    x_rot, x_pass = x[..., :d].float(), x[..., d:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    cos, sin = cos[:, :, None], sin[:, :, None]  # broadcast over heads
    out = (x_rot * cos + rotated * sin).to(x.dtype)
    return torch.cat((out, x_pass), dim=-1) if x_pass.shape[-1] else out


# ----------------------------------------------------------------------------- attention

def resolve_attn_impl(impl: str, device: torch.device, packed=False) -> str:
    """auto on a GPU: flash-attn-4 for plain causal rows on Hopper or newer when installed (faster than cuDNN on
    an H100: README, training); else flash_attn if installed; else FlexAttention for packed documents (it skips
    the masked-out blocks) and sdpa (its cuDNN / flash kernels) for plain rows. sdpa on CPU."""
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


# ----------------------------------------------------------------------------- KV cache

class KVCache:
    """Static, preallocated keys/values: k[layer], v[layer] are (B, n_kv_heads, max_len, head_dim).
    New entries are written at slot positions given as a tensor (index_copy_), so a one-token decode
    step has fixed shapes and can be torch.compile'd with CUDA graphs. `valid` (B, max_len) marks the
    slots that hold real tokens (left padding does not), so later steps need no attention_mask.
    `length` counts filled slots when the model picks the slots itself (cache_pos=None)."""

    def __init__(self, args: ModelArgs, batch_size, max_len, dtype=torch.float32, device="cpu"):
        shape = (batch_size, args.n_kv_heads, max_len, args.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.max_len = max_len
        self.length = 0

    def update(self, layer, cache_pos, k, v):
        self.k[layer].index_copy_(2, cache_pos, k.to(self.k[layer].dtype))
        self.v[layer].index_copy_(2, cache_pos, v.to(self.v[layer].dtype))
        return self.k[layer], self.v[layer]


# ----------------------------------------------------------------------------- blocks

class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in fp32 (as HF: weight applied after casting back)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class Attention(nn.Module):
    """Shared by both archs: project to q, k, v -> RoPE -> KV cache -> attention -> output projection."""

    # While training, a replacement for `attention` with the same signature; fine_tuning.py sets it for
    # LongLoRA's shifted sparse attention (S2-Attn). Inference always uses full attention.
    train_attn_fn = None

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.args, self.layer = args, layer

    def forward(self, x, cos, sin, impl, mask, cache=None, cache_pos=None):
        B, T, _ = x.shape
        q, k, v = self.qkv(x)  # each (B, T, heads, head_dim)
        # RoPE before the transpose, in the projections' own memory order: its compiled kernels then read and
        # write contiguously at full bandwidth (applied to the (B, H, T, D) view, forward and backward kernels
        # also did the transpose, at a fraction of it). The transpose after is a view: sdpa / cuDNN / flash
        # take (B, H, T, D) with this stride layout as is.
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer, cache_pos, k, v)
            k, v = k.to(q.dtype), v.to(q.dtype)
        dropout_p = self.args.dropout if self.training else 0.0
        attn = self.train_attn_fn if self.training and self.train_attn_fn is not None else attention
        y = attn(q, k, v, impl, mask, dropout_p)
        return self.out(y.transpose(1, 2).reshape(B, T, -1))


class LlamaAttention(Attention):
    def __init__(self, args, layer):
        super().__init__(args, layer)
        hd = args.head_dim
        self.q_proj = nn.Linear(args.dim, args.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(args.n_heads * hd, args.dim, bias=False)

    def qkv(self, x):
        B, T, _ = x.shape
        hd = self.args.head_dim
        return (self.q_proj(x).view(B, T, -1, hd), self.k_proj(x).view(B, T, -1, hd),
                self.v_proj(x).view(B, T, -1, hd))

    def out(self, y):
        return self.o_proj(y)


class NeoXAttention(Attention):
    def __init__(self, args, layer):
        super().__init__(args, layer)
        self.query_key_value = nn.Linear(args.dim, 3 * args.dim)
        self.dense = nn.Linear(args.dim, args.dim)

    def qkv(self, x):
        # fused projection laid out per head: [q_h0, k_h0, v_h0, q_h1, k_h1, v_h1, ...]
        B, T, _ = x.shape
        return self.query_key_value(x).view(B, T, self.args.n_heads, 3 * self.args.head_dim).chunk(3, dim=-1)

    def out(self, y):
        return self.dense(y)


class LlamaMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, args):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.up_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.down_proj = nn.Linear(args.hidden_dim, args.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class NeoXMLP(nn.Module):
    """dense_4h_to_h(gelu(dense_h_to_4h(x))), exact (erf) GELU, with biases."""

    def __init__(self, args):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(args.dim, args.hidden_dim)
        self.dense_4h_to_h = nn.Linear(args.hidden_dim, args.dim)

    def forward(self, x):
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x)))


class LlamaBlock(nn.Module):
    """Pre-norm: x = x + attn(norm(x)); x = x + mlp(norm(x))."""

    def __init__(self, args, layer):
        super().__init__()
        self.self_attn = LlamaAttention(args, layer)
        self.mlp = LlamaMLP(args)
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.drop = nn.Dropout(args.dropout)

    def forward(self, x, *attn_args):
        x = x + self.drop(self.self_attn(self.input_layernorm(x), *attn_args))
        return x + self.drop(self.mlp(self.post_attention_layernorm(x)))


class NeoXBlock(nn.Module):
    """Parallel residual: x + attn(ln1(x)) + mlp(ln2(x)); or sequential like Llama when disabled."""

    def __init__(self, args, layer):
        super().__init__()
        self.parallel = args.use_parallel_residual
        self.attention = NeoXAttention(args, layer)
        self.mlp = NeoXMLP(args)
        self.input_layernorm = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.drop = nn.Dropout(args.dropout)

    def forward(self, x, *attn_args):
        a = self.drop(self.attention(self.input_layernorm(x), *attn_args))
        if self.parallel:
            return x + a + self.drop(self.mlp(self.post_attention_layernorm(x)))
        x = x + a
        return x + self.drop(self.mlp(self.post_attention_layernorm(x)))


# ----------------------------------------------------------------------------- the model

class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of the logits h @ weight.T over targets != -100, with its gradients computed in
    forward, chunk by chunk (the fused linear cross-entropy of Liger-Kernel, in plain torch):

        logits = hc @ W^T          (compute dtype: bf16 under autocast)   lse = log sum_j exp(logits_j), fp32
        loss  += sum(lse - logits[target])                                 over the chunk's kept rows
        dlogits = softmax(logits) - onehot(target), zero on ignored rows   (d loss / d logits)
        dh_chunk = dlogits @ W     dW += dlogits^T @ hc  (summed over the chunks in fp32)

    Only one chunk's fp32 logits exist at a time, and the head costs its three GEMMs: plain autograd would keep
    every chunk's logits for backward (GBs), and recomputing them there instead (checkpoint) adds a fourth.
    The output is a plain sum, so backward only scales the saved dh and dW by the incoming gradient."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_tokens, dtype):
        # h (N, dim), weight (V, dim), targets (N,); dtype: of the GEMMs (fp32 master weights are cast once)
        need_dh, need_dw = ctx.needs_input_grad[:2]
        w = weight.to(dtype)
        total = h.new_zeros((), dtype=torch.float32)
        dh = []
        dw = torch.zeros_like(weight, dtype=torch.float32) if need_dw else None
        for hc, tc in zip(h.split(chunk_tokens), targets.split(chunk_tokens)):
            hc = hc.to(dtype)
            logits = (hc @ w.T).float()
            keep = tc != -100
            tc = torch.where(keep, tc, 0)  # any valid index; those rows are zeroed below
            lse = torch.logsumexp(logits, dim=-1)
            total = total + ((lse - logits.gather(1, tc[:, None])[:, 0]) * keep).sum()
            dlogits = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            dlogits.scatter_add_(1, tc[:, None], torch.full_like(lse[:, None], -1.0))  # - onehot(target)
            dlogits = (dlogits * keep[:, None]).to(dtype)
            if need_dh:
                dh.append((dlogits @ w).to(h.dtype))
            if need_dw:
                dw += (dlogits.T @ hc).float()
        ctx.save_for_backward(torch.cat(dh) if need_dh else None, dw.to(weight.dtype) if need_dw else None)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        dh, dw = ctx.saved_tensors
        return (dh * grad_total if dh is not None else None, dw * grad_total if dw is not None else None,
                None, None, None)


def chunked_cross_entropy(h, weight, targets, reduction="mean", chunk_tokens=4096):
    """Cross-entropy of the head `h @ weight.T` without holding fp32 logits for the whole batch: tokens go
    through in chunks; under autograd LinearCrossEntropy also computes the gradients chunk by chunk, in
    forward. targets == -100 are ignored. Under autocast the GEMMs run in the autocast dtype."""
    h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    device = h.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        total = LinearCrossEntropy.apply(h, weight, targets, chunk_tokens, dtype)
    else:
        w = weight.to(dtype)
        total = sum((F.cross_entropy((hc.to(dtype) @ w.T).float(), tc, ignore_index=-100, reduction="sum")
                     for hc, tc in zip(h.split(chunk_tokens), targets.split(chunk_tokens))),
                    h.new_zeros((), dtype=torch.float32))
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / (targets != -100).sum().clamp(min=1)
    raise ValueError(f"reduction: {reduction!r} is not 'mean' or 'sum'")


class Transformer(nn.Module):
    # Under bf16 autocast the fp32 master weights make the embedding output fp32, and every residual add
    # would stay fp32. Casting it keeps the residual stream in bf16 (as Megatron does by default): half the
    # memory traffic of the norms and adds, and smaller saved activations. fp16 keeps the fp32 stream: its
    # range (max 65504) risks overflow in a residual sum. bench.py train --sides measures both.
    bf16_residual = True

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        # submodule names follow transformers so that state_dict() is the HF checkpoint
        if args.arch == "llama":
            self.model = nn.Module()
            self.model.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
            self.model.layers = nn.ModuleList(LlamaBlock(args, i) for i in range(args.n_layers))
            self.model.norm = RMSNorm(args.dim, args.norm_eps)
            self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        else:
            self.gpt_neox = nn.Module()
            self.gpt_neox.embed_in = nn.Embedding(args.vocab_size, args.dim)
            self.gpt_neox.layers = nn.ModuleList(NeoXBlock(args, i) for i in range(args.n_layers))
            self.gpt_neox.final_layer_norm = nn.LayerNorm(args.dim, eps=args.norm_eps)
            self.embed_out = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(args)
        self.drop = nn.Dropout(args.dropout)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2 style: shrink the residual-path projections by depth
            if name.endswith(("o_proj.weight", "down_proj.weight", "attention.dense.weight", "dense_4h_to_h.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * args.n_layers))
        if args.tie_word_embeddings:
            self.output.weight = self.embed.weight

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    # the four parts by role, whatever the arch calls them
    @property
    def embed(self):
        return self.model.embed_tokens if self.args.arch == "llama" else self.gpt_neox.embed_in

    @property
    def layers(self):
        return self.model.layers if self.args.arch == "llama" else self.gpt_neox.layers

    @property
    def final_norm(self):
        return self.model.norm if self.args.arch == "llama" else self.gpt_neox.final_layer_norm

    @property
    def output(self):
        return self.lm_head if self.args.arch == "llama" else self.embed_out

    def new_cache(self, batch_size, max_len, dtype=None, device=None) -> KVCache:
        p = self.embed.weight
        return KVCache(self.args, batch_size, max_len, dtype or p.dtype, device or p.device)

    def forward(self, input_ids, targets=None, position_ids=None, doc_ids=None, attention_mask=None,
                cache=None, reduction="mean", cache_pos=None):
        """Logits (B, T, vocab) or, with targets, the loss. With a cache, the T new tokens go to slots
        `cache_pos` (T,) (default: the next free ones) and attend over everything cached before them.
        position_ids given without a cache are below T (packed documents restart at 0), as RoPE assumes."""
        B, T = input_ids.shape
        device = input_ids.device
        if cache is not None:
            if doc_ids is not None:
                raise ValueError("doc_ids: packed documents cannot be combined with a KV cache")
            if cache_pos is None:
                cache_pos = torch.arange(cache.length, cache.length + T, device=device)
                cache.length += T
            real = attention_mask[:, -T:].bool() if attention_mask is not None else \
                torch.ones(B, T, dtype=torch.bool, device=device)
            cache.valid.index_copy_(1, cache_pos, real)
            if position_ids is None:  # left padding: the position of a token = real tokens before it
                before = cache.valid.long().cumsum(1) - 1
                position_ids = before.index_select(1, cache_pos).clamp(min=0)
        elif position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            else:
                position_ids = torch.arange(T, device=device).expand(B, T)

        impl = resolve_attn_impl(self.args.attn_impl, device, packed=doc_ids is not None)
        impl, mask = build_attn_mask(impl, T, device, doc_ids, attention_mask, cache, cache_pos)
        cos, sin = self.rotary(position_ids, cache.max_len if cache is not None else T)

        x = self.drop(self.embed(input_ids))
        if self.bf16_residual and torch.is_autocast_enabled(device.type) and \
                torch.get_autocast_dtype(device.type) == torch.bfloat16:
            x = x.to(torch.bfloat16)
        for block in self.layers:
            x = block(x, cos, sin, impl, mask, cache, cache_pos)
        x = self.final_norm(x)
        if targets is None:
            return self.output(x).float()
        return chunked_cross_entropy(x, self.output.weight, targets, reduction)

    # ------------------------------------------------------------------------- generation

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens, attention_mask=None, temperature=0.0, top_k=None, top_p=None,
                 eos_id=None):
        """Prompt + up to max_new_tokens new tokens. Greedy at temperature 0, else sampled (top_k / top_p
        filtered). A row that produced eos_id (default args.eos_id) is filled with pad_id afterwards and
        generation stops once every row has. Batches may be left-padded (attention_mask 0 on padding)."""
        eos_id = self.args.eos_id if eos_id is None else eos_id
        B, T = input_ids.shape
        cache = self.new_cache(B, T + max_new_tokens)
        logits = self(input_ids, attention_mask=attention_mask, cache=cache)[:, -1]
        out, done = [input_ids], torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            nxt = sample(logits, temperature, top_k, top_p)
            nxt = torch.where(done, torch.full_like(nxt, self.args.pad_id), nxt)
            done = done | (nxt == eos_id)
            out.append(nxt[:, None])
            if done.all() or step == max_new_tokens - 1:
                break
            logits = self(nxt[:, None], cache=cache)[:, -1]
        return torch.cat(out, dim=1)

    # ------------------------------------------------------------------------- accounting

    def num_params(self, non_embedding=False) -> int:
        """All parameters (a tied matrix once). non_embedding drops the input embedding unless it is tied to
        the head (then it does the head's matmul)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and not self.args.tie_word_embeddings:
            n -= self.embed.weight.numel()
        return n

    def estimate_mfu(self, tokens_per_sec, peak_flops=989e12, seq_len=None) -> float:
        """Model flops utilisation (PaLM appendix B): per token 6N for the matmuls of forward+backward plus
        12*L*H*Q*T for attention scores and values; divided by the peak (H100 bf16 dense = 989 TFLOPS)."""
        a = self.args
        T = seq_len or a.max_seq_len
        flops_per_token = 6 * self.num_params(non_embedding=True) + 12 * a.n_layers * a.n_heads * a.head_dim * T
        return tokens_per_sec * flops_per_token / peak_flops

    # ------------------------------------------------------------------------- checkpoint folders

    def save_pretrained(self, folder, tokenizer_path=None):
        """config.json (HF keys + ours under "model_args"), model.safetensors, tokenizer copied in."""
        from safetensors.torch import save_file
        os.makedirs(folder, exist_ok=True)
        config = hf_config(self.args)
        config["torch_dtype"] = str(self.embed.weight.dtype).removeprefix("torch.")
        config["model_args"] = asdict(self.args)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        if self.args.tie_word_embeddings:  # as HF: the tied head is not stored
            state.pop("lm_head.weight" if self.args.arch == "llama" else "embed_out.weight")
        _atomic(os.path.join(folder, "model.safetensors"), lambda p: save_file(state, p, metadata={"format": "pt"}))
        _atomic(os.path.join(folder, "config.json"), lambda p: _write_json(config, p))
        if tokenizer_path:
            # a tokenizer file comes with its siblings: transformers needs tokenizer.json and its config
            # to keep the chat-role tokens whole (rebuilt from tokenizer.model alone, it splits them)
            src = tokenizer_path if os.path.isdir(tokenizer_path) else os.path.dirname(tokenizer_path)
            files = {os.path.join(src, f) for f in TOKENIZER_FILES if os.path.exists(os.path.join(src, f))}
            if not os.path.isdir(tokenizer_path):
                files.add(tokenizer_path)
            for f in files:
                dst = os.path.join(folder, os.path.basename(f))
                if os.path.abspath(f) != os.path.abspath(dst):
                    _atomic(dst, lambda p, f=f: shutil.copyfile(f, p))

    @classmethod
    def from_pretrained(cls, folder, dtype=torch.float32, **overrides) -> "Transformer":
        """Load our folder or a Hugging Face Llama / GPT-NeoX folder. overrides replace ModelArgs fields
        (attn_impl, max_seq_len, rope_scaling, ...). dtype: of the parameters ("auto" keeps the stored one)."""
        config_path = os.path.join(folder, "config.json")
        if not os.path.exists(config_path):
            raise SystemExit(f"{config_path}: no config.json (not a checkpoint folder)")
        with open(config_path) as f:
            config = json.load(f)
        try:
            args = args_from_config(config)
            bad = set(overrides) - {f.name for f in fields(ModelArgs)}
            if bad:
                raise ValueError(f"{sorted(bad)[0]}: not a ModelArgs field")
            args = ModelArgs(**{**asdict(args), **overrides})
        except ValueError as e:
            raise SystemExit(f"{config_path}: {e}") from None
        state = load_state_dict(folder)
        if dtype == "auto":
            dtype = next(iter(state.values())).dtype
        model = cls(args).to(dtype)
        if config.get("quantization_config"):
            # GPTQ folders: quantize.py swaps the Linear layers for its QuantLinear and loads the packed weights
            from quantize import load_quantized
            load_quantized(model, state, config["quantization_config"])
            return model
        head = "lm_head.weight" if args.arch == "llama" else "embed_out.weight"
        if args.tie_word_embeddings:
            state.pop(head, None)  # HF ignores a stored copy of a tied head too
        # old HF checkpoints carry RoPE / causal-mask buffers that are recomputed here
        state = {k: v for k, v in state.items()
                 if not k.endswith(("rotary_emb.inv_freq", "attention.bias", "attention.masked_bias"))}
        expected = set(model.state_dict()) - ({head} if args.tie_word_embeddings else set())
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise SystemExit(f"{folder}: weights do not match the config (missing {sorted(missing)[:3]}, "
                             f"unexpected {sorted(unexpected)[:3]})")
        model.load_state_dict(state, strict=False)
        return model


def sample(logits, temperature=0.0, top_k=None, top_p=None):
    """Next token per row from (B, vocab) logits: argmax at temperature 0, else softmax(logits/T) restricted
    to the top_k most likely and to the smallest set whose probability reaches top_p (nucleus)."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs > top_p  # mass before this token already reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(F.softmax(logits, dim=-1), 1)[:, 0]


# ----------------------------------------------------------------------------- HF config mapping

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def hf_rope_parameters(args: ModelArgs) -> dict:
    """rope_parameters as transformers 5 reads them (rope_theta inside). Our fixed-alpha "ntk" is not an HF
    type, but it is exactly the default RoPE with the stretched base, so it exports as that."""
    rs = dict(args.rope_scaling or {"rope_type": "default"})
    theta = args.rope_theta
    if rs["rope_type"] == "ntk":
        d = int(args.head_dim * args.rotary_pct)
        rs, theta = {"rope_type": "default"}, theta * rs["factor"] ** (d / (d - 2))
    params = {**rs, "rope_theta": theta}
    if args.arch == "neox":
        params["partial_rotary_factor"] = args.rotary_pct
    return params


def hf_config(args: ModelArgs) -> dict:
    """The transformers config.json of these args (transformers 4 keys kept beside rope_parameters)."""
    rope = hf_rope_parameters(args)
    common = dict(vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.hidden_dim,
                  num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
                  max_position_embeddings=args.max_seq_len, tie_word_embeddings=args.tie_word_embeddings,
                  bos_token_id=args.bos_id, eos_token_id=args.eos_id, pad_token_id=args.pad_id,
                  rope_parameters=rope, rope_theta=rope["rope_theta"], initializer_range=0.02, use_cache=True)
    legacy_scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
    common["rope_scaling"] = legacy_scaling if legacy_scaling["rope_type"] != "default" else None
    if args.arch == "llama":
        return dict(architectures=["LlamaForCausalLM"], model_type="llama", **common,
                    num_key_value_heads=args.n_kv_heads, head_dim=args.head_dim, hidden_act="silu",
                    rms_norm_eps=args.norm_eps, attention_bias=False, mlp_bias=False,
                    attention_dropout=args.dropout)
    return dict(architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox", **common, hidden_act="gelu",
                layer_norm_eps=args.norm_eps, use_parallel_residual=args.use_parallel_residual,
                rotary_pct=args.rotary_pct, rotary_emb_base=rope["rope_theta"], attention_bias=True,
                attention_dropout=args.dropout, hidden_dropout=args.dropout)


def args_from_config(config: dict) -> ModelArgs:
    """ModelArgs from our config.json ("model_args") or a transformers Llama / GPT-NeoX one.
    Anything this model cannot reproduce is a ValueError naming the config key."""
    if "model_args" in config:
        return ModelArgs(**config["model_args"])
    model_type = config.get("model_type")
    if model_type not in ("llama", "gpt_neox"):
        raise ValueError(f"model_type: {model_type!r} is not supported (llama | gpt_neox)")

    def require(key, allowed, default):
        if config.get(key, default) not in allowed:
            raise ValueError(f"{key}: {config.get(key)!r} is not supported (expected {allowed[0]!r})")

    dim, n_heads = config["hidden_size"], config["num_attention_heads"]
    # rope: transformers 5 "rope_parameters" (theta inside) or the legacy "rope_scaling" + "rope_theta"
    rope = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
    theta = (config.get("rope_parameters") or {}).get("rope_theta") or rope.get("rope_theta") or \
        config.get("rope_theta") or config.get("rotary_emb_base") or 10000.0
    common = dict(dim=dim, n_layers=config["num_hidden_layers"], n_heads=n_heads,
                  vocab_size=config["vocab_size"], hidden_dim=config["intermediate_size"],
                  max_seq_len=config.get("max_position_embeddings", 2048), rope_theta=float(theta),
                  rope_scaling=rope or None, tie_word_embeddings=config.get("tie_word_embeddings", False),
                  bos_id=_first(config.get("bos_token_id"), 1), eos_id=_first(config.get("eos_token_id"), 2),
                  pad_id=_first(config.get("pad_token_id"), 0))
    if model_type == "llama":
        require("hidden_act", ["silu"], "silu")
        require("attention_bias", [False], False)
        require("mlp_bias", [False], False)
        if config.get("head_dim") not in (None, dim // n_heads):
            raise ValueError(f"head_dim: {config['head_dim']} != hidden_size / num_attention_heads")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("rope_parameters.partial_rotary_factor: partial rotary is not supported for llama")
        return ModelArgs(arch="llama", n_kv_heads=config.get("num_key_value_heads") or n_heads,
                         norm_eps=config.get("rms_norm_eps", 1e-6), **common)
    require("hidden_act", ["gelu"], "gelu")
    require("attention_bias", [True], True)
    pct = (config.get("rope_parameters") or {}).get("partial_rotary_factor") or config.get("rotary_pct", 0.25)
    return ModelArgs(arch="neox", norm_eps=config.get("layer_norm_eps", 1e-5), rotary_pct=float(pct),
                     use_parallel_residual=config.get("use_parallel_residual", True), **common)


def _first(x, default):  # HF allows a list of eos ids; we keep the first
    if isinstance(x, list):
        return x[0] if x else default
    return default if x is None else x


def load_state_dict(folder) -> dict:
    """Tensors of a checkpoint folder: model.safetensors, a sharded *.safetensors.index.json, or pytorch_model.bin."""
    from safetensors.torch import load_file
    single = os.path.join(folder, "model.safetensors")
    if os.path.exists(single):
        return load_file(single)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = os.path.join(folder, index_name)
        if os.path.exists(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            state = {}
            for s in shards:
                path = os.path.join(folder, s)
                state.update(load_file(path) if s.endswith(".safetensors")
                             else torch.load(path, map_location="cpu", weights_only=True))
            return state
    binary = os.path.join(folder, "pytorch_model.bin")
    if os.path.exists(binary):
        return torch.load(binary, map_location="cpu", weights_only=True)
    raise SystemExit(f"{folder}: no model.safetensors, sharded index or pytorch_model.bin")


def _write_json(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def _atomic(path, write):
    """write(tmp_path) then rename, so a crash never leaves a half-written file under the real name."""
    write(path + ".tmp")
    os.replace(path + ".tmp", path)
