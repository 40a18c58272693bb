"""The model: Llama and GPT-NeoX in one readable file, weight-for-weight the same as Hugging Face's.

Parameter names and layouts equal transformers' LlamaForCausalLM / GPTNeoXForCausalLM, so a folder
written by `save_pretrained` loads in `AutoModelForCausalLM.from_pretrained` with the same logits
(tests/test_model.py proves it against transformers). Read top to bottom:

  ModelArgs      the hyperparameters (+ named presets)
  RoPE           rotary position embedding (its scalings: rope.py)
  KVCache        static preallocated cache for incremental decoding (gpt-fast style)
  blocks         Llama (RMSNorm, SwiGLU) and NeoX (LayerNorm, GELU, parallel residual) layers; attention is
                 one call into attention.py, which holds the backends (eager, sdpa, flex, flash_attn, fa4)
  Transformer    forward (logits, or the chunked loss of loss.py), generate, save/load (checkpoint.py)
"""
import math
import os
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from attention import ATTN_IMPLS, attention, build_attn_mask, resolve_attn_impl
from checkpoint import (args_from_config, head_name, hf_config, load_state_dict, load_weights, model_folder,
                        read_config, save_folder)
from loss import chunked_cross_entropy
from rope import normalize_rope_scaling, rope_inv_freq


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


# ----------------------------------------------------------------------------- RoPE

class RotaryEmbedding(nn.Module):
    """cos/sin of the angles m * theta_i in the HF "rotate-half" layout: dims (i, i + d/2) form a pair.

    Positions below max_seq_len read fp32 tables made once. Computed inside a compiled model instead, cos and
    sin would be fused into every layer's RoPE kernel, forward and backward, and evaluated again for each
    element of every head. Dynamic NTK rescales with the length, so it always computes."""

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

    # While training, a replacement for `attention` with the same signature; lora.py sets it for
    # LongLoRA's shifted sparse attention (S2-Attn). Inference always uses full attention.
    train_attn_fn = None

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.args, self.layer = args, layer

    def forward(self, x, cos, sin, impl, mask, cache=None, cache_pos=None):
        B, T, _ = x.shape
        q, k, v = self.qkv(x)  # each (B, T, heads, head_dim)
        # RoPE before the transpose, in the projections' own memory order: its compiled kernels then read and
        # write contiguously (on the (B, H, T, D) view, forward and backward would also do the transpose).
        # The transpose after is a view: sdpa / cuDNN / flash take (B, H, T, D) with this stride layout as is.
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

class Transformer(nn.Module):
    """Token ids -> embedding -> n_layers blocks -> final norm -> output head (logits, or the loss)."""

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
        return getattr(self, head_name(self.args.arch))  # lm_head | embed_out

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

        x = self.embed_input(input_ids)
        for block in self.layers:
            x = block(x, cos, sin, impl, mask, cache, cache_pos)
        x = self.final_norm(x)
        if targets is None:
            return self.output(x).float()
        return chunked_cross_entropy(x, self.output.weight, targets, reduction)

    def embed_input(self, input_ids):
        """The residual stream's start. Under bf16 autocast the fp32 master weights make the embedding output
        fp32, and every residual add would stay fp32. Casting it keeps the residual stream in bf16 (as Megatron
        does by default): half the memory traffic of the norms and adds, and smaller saved activations. fp16
        keeps the fp32 stream: its range (max 65504) risks overflow in a residual sum."""
        x = self.drop(self.embed(input_ids))
        device = input_ids.device.type
        if torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.bfloat16:
            x = x.to(torch.bfloat16)
        return x

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
        config = hf_config(self.args)
        config["torch_dtype"] = str(self.embed.weight.dtype).removeprefix("torch.")
        config["model_args"] = asdict(self.args)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        if self.args.tie_word_embeddings:  # as HF: the tied head is not stored
            state.pop(head_name(self.args.arch) + ".weight")
        save_folder(folder, state, config, tokenizer_path)

    @classmethod
    def from_pretrained(cls, folder, dtype=torch.float32, **overrides) -> "Transformer":
        """Load our folder, a Hugging Face Llama / GPT-NeoX folder or a GPTQ one (quantize.py). overrides
        replace ModelArgs fields (attn_impl, max_seq_len, rope_scaling, ...): the one way to change the context
        of a loaded model. A new YaRN rope_scaling keeps the trained length as its original length (YaRN's L0),
        else it would measure from the new max_seq_len. dtype: of the parameters ("auto" keeps the stored one)."""
        folder = model_folder(folder)  # a trainer's step_N/ is accepted too
        config = read_config(folder)
        try:
            args = ModelArgs(**args_from_config(config, ModelArgs))
            bad = set(overrides) - {f.name for f in fields(ModelArgs)}
            if bad:
                raise ValueError(f"{sorted(bad)[0]}: not a ModelArgs field")
            rs = overrides.get("rope_scaling")
            if rs and rs.get("rope_type", rs.get("type")) == "yarn":
                rs = overrides["rope_scaling"] = dict(rs)
                rs.setdefault("original_max_position_embeddings", args.max_seq_len)
            args = ModelArgs(**{**asdict(args), **overrides})
        except ValueError as e:
            raise SystemExit(f"{os.path.join(folder, 'config.json')}: {e}") from None
        state = load_state_dict(folder)
        if dtype == "auto":
            dtype = next(iter(state.values())).dtype
        return load_weights(cls(args).to(dtype), state, config, folder)


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
