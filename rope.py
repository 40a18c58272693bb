"""RoPE frequencies and the scalings that stretch a model past its trained length, each with its formula.

The rotary embedding turns position m into the angles m * theta_i with theta_i = base^(-2i/d), i < d/2 (d: the
rotated dims of a head). A scaling changes the theta_i (and YaRN also scales cos/sin):

  linear   position interpolation           theta_i / factor
  ntk      NTK-aware, fixed alpha           base' = base * factor^(d/(d-2))
  dynamic  NTK with the current length      base' = base * (factor*L/L0 - (factor-1))^(d/(d-2))
  yarn     NTK-by-parts + temperature       a ramp between theta_i and theta_i / factor, cos/sin * mscale
  llama3   Llama 3.1's by-wavelength mix    like yarn's ramp, measured in wavelengths

rope_scaling dicts follow transformers' semantics ({"rope_type": ..., "factor": ..., ...}); model.py's
RotaryEmbedding turns the frequencies into cos/sin.
"""
import math

import torch

ROPE_TYPES = ("default", "linear", "ntk", "dynamic", "yarn", "llama3")


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


def rope_inv_freq(args, seq_len=None):
    """Inverse frequencies theta_i = base^(-2i/d), i < d/2, after rope scaling, and the attention factor
    that multiplies cos/sin (YaRN's temperature; 1 otherwise). Always fp32. d = rotated dims per head.
    args: a ModelArgs; seq_len (a tensor) is only used by dynamic NTK."""
    d = int(args.head_dim * args.rotary_pct)
    rs = args.rope_scaling or {"rope_type": "default"}
    kind = rs["rope_type"]
    exponent = torch.arange(0, d, 2, dtype=torch.int64).float() / d
    if kind == "dynamic":
        return dynamic_ntk_inv_freq(exponent, args.rope_theta, rs["factor"], d, args.max_seq_len, seq_len), 1.0
    base = ntk_base(args.rope_theta, rs["factor"], d) if kind == "ntk" else args.rope_theta
    inv_freq = 1.0 / (base ** exponent)
    if kind == "linear":
        # position interpolation: position m becomes m/factor, i.e. theta_i / factor
        return inv_freq / rs["factor"], 1.0
    if kind == "yarn":
        return yarn_inv_freq(inv_freq, rs, d, base)
    if kind == "llama3":
        return llama3_inv_freq(inv_freq, rs), 1.0
    return inv_freq, 1.0


def ntk_base(base, factor, d):
    """NTK-aware (fixed alpha): stretch the base so the lowest frequency is interpolated by alpha = factor
    while the highest is untouched: base' = base * alpha^(d/(d-2))."""
    return base * factor ** (d / (d - 2))


def dynamic_ntk_inv_freq(exponent, base, factor, d, L0, seq_len):
    """Dynamic NTK: the NTK base grows with the current length L once L exceeds the trained length L0:
    base' = base * (factor*L/L0 - (factor-1))^(d/(d-2)), L = max(L, L0)   (recomputed every call)."""
    L = torch.clamp(seq_len.float(), min=L0) if seq_len is not None else torch.tensor(float(L0))
    base = base * (factor * L / L0 - (factor - 1)) ** (d / (d - 2))
    return 1.0 / (base ** exponent.to(L.device))


def yarn_inv_freq(inv_freq, rs, d, base):
    """YaRN = NTK-by-parts + temperature. A dim with wavelength 2*pi/theta_i that completes more than
    beta_fast rotations within L0 is kept (extrapolated), fewer than beta_slow is interpolated
    (theta_i/factor), a linear ramp in between. Attention logits are scaled by mscale^2 through
    cos/sin, mscale = 0.1*ln(factor) + 1 (or the ratio with mscale/mscale_all_dim, DeepSeek style).
    Returns (inv_freq, mscale)."""
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


def llama3_inv_freq(inv_freq, rs):
    """Llama 3.1: wavelengths longer than L0/low_freq_factor are interpolated (theta/factor), shorter than
    L0/high_freq_factor kept, in between a smooth mix s*theta + (1-s)*theta/factor, s = (L0/wavelen - lo)/(hi - lo)."""
    factor, lo, hi, L0 = (rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"],
                          rs["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    smooth = (L0 / wavelen - lo) / (hi - lo)
    mixed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return torch.where(wavelen > L0 / lo, inv_freq / factor, torch.where(wavelen < L0 / hi, inv_freq, mixed))
