"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers") as a library: the algorithm for one weight matrix, written out step by step, round-to-nearest
(RTN) as the baseline, and the AutoGPTQ / GPTQModel checkpoint layout. quantize.py runs it over a model.

Every quantized nn.Linear(in, out) becomes a QuantLinear holding
    qweight  int32 (in * bits / 32, out)   the integer weights packed along the input dim
    qzeros   int32 (groups, out * bits / 32) the integer zero points packed along the output dim
    scales   fp16  (groups, out)
    g_idx    int32 (in,)                   the group of each input column (not monotone with act-order)
    bias     fp16  (out,)                  if the layer has one
and the dequantized weight is  W[o, i] = scales[g_idx[i], o] * (q[i, o] - zero[g_idx[i], o]).
load_quantized swaps a model's Linear layers for QuantLinear when a checkpoint folder has a "quantization_config".
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

BITS = (2, 3, 4, 8)


# ----------------------------------------------------------------------------- bit packing
# Values of `bits` bits are laid end to end as one little-endian bit stream that is cut into 32-bit words:
# value j of a run of 32 starts at bit bits*j. 32 values fill exactly `bits` words, so for 2/4/8 bits a word
# holds 32/bits whole values, and for 3 bits values 10 and 21 straddle two words (AutoGPTQ's 3-bit layout).

def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 holding unsigned 32-bit words -> the same bits as int32 (two's complement)."""
    words = words & 0xFFFFFFFF
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def pack_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    """(n, cols) ints in [0, 2^bits) -> (n * bits / 32, cols) int32, packed along dim 0 (n % 32 == 0)."""
    n, cols = q.shape
    q = q.to(torch.int64).reshape(n // 32, 32, cols)
    words = torch.zeros(n // 32, bits + 1, cols, dtype=torch.int64, device=q.device)  # +1: spill of the last value
    for j in range(32):
        word, shift = divmod(bits * j, 32)
        words[:, word] |= q[:, j] << shift  # int64: bits past 32 are the spill into the next word
        words[:, word + 1] |= q[:, j] >> (32 - shift) if shift + bits > 32 else 0
    return _to_int32(words[:, :bits]).reshape(n // 32 * bits, cols)


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack_rows: (n * bits / 32, cols) int32 -> (n, cols) int32."""
    rows, cols = packed.shape
    words = (packed.to(torch.int64) & 0xFFFFFFFF).reshape(rows // bits, bits, cols)
    words = torch.cat([words, torch.zeros_like(words[:, :1])], dim=1)
    out = torch.empty(rows // bits, 32, cols, dtype=torch.int64, device=packed.device)
    for j in range(32):
        word, shift = divmod(bits * j, 32)
        out[:, j] = ((words[:, word] >> shift) | (words[:, word + 1] << (32 - shift))) & (2 ** bits - 1)
    return out.reshape(rows // bits * 32, cols).to(torch.int32)


def pack_cols(q, bits):
    return pack_rows(q.t(), bits).t().contiguous()


def unpack_cols(packed, bits):
    return unpack_rows(packed.t(), bits).t().contiguous()


# GPTQ "v1" checkpoints (checkpoint_format "gptq", what AutoGPTQ wrote and GPTQModel 7.6.0 exports) store every
# zero point minus one. GPTQModel applies the -1 (on save) and +1 (on load) to the packed int32 words for 2/4/8
# bits (a zero of 0 borrows from its neighbour; the add on load undoes it exactly) and field by field, modulo
# 2^bits, for 3 bits. We do the same so our files are bit-identical to theirs. "gptq_v2" stores the zeros as is.

def encode_qzeros(zeros: torch.Tensor, bits: int, checkpoint_format: str) -> torch.Tensor:
    if checkpoint_format == "gptq_v2":
        return pack_cols(zeros, bits)
    if bits == 3:
        return pack_cols((zeros - 1) & 7, bits)
    return _to_int32(pack_cols(zeros, bits).to(torch.int64) - pack_cols(torch.ones_like(zeros), bits).to(torch.int64))


def decode_qzeros(qzeros: torch.Tensor, bits: int, checkpoint_format: str) -> torch.Tensor:
    if checkpoint_format == "gptq_v2":
        return unpack_cols(qzeros, bits)
    if bits == 3:
        return (unpack_cols(qzeros, bits) + 1) & 7
    ones = pack_cols(torch.ones(qzeros.shape[0], qzeros.shape[1] * 32 // bits, dtype=torch.int32), bits)
    return unpack_cols(_to_int32(qzeros.to(torch.int64) + ones.to(qzeros.device).to(torch.int64)), bits)


# ----------------------------------------------------------------------------- the quantized layer

class QuantLinear(nn.Module):
    """A Linear whose weight lives in the GPTQ layout. The forward dequantizes the whole weight once per call
    (in the activation dtype: bf16/fp16 on GPU, fp32 on CPU) and does one dense matmul."""

    def __init__(self, in_features, out_features, bias, bits, group_size, checkpoint_format="gptq"):
        super().__init__()
        if in_features % 32 or out_features % 32:
            raise ValueError(f"GPTQ packing needs in/out features divisible by 32, got {in_features}x{out_features}")
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = group_size if group_size > 0 else in_features
        self.checkpoint_format = checkpoint_format
        groups = math.ceil(in_features / self.group_size)
        self.register_buffer("qweight", torch.zeros(in_features * bits // 32, out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(groups, out_features * bits // 32, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", torch.arange(in_features, dtype=torch.int32) // self.group_size)
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16) if bias else None)

    @classmethod
    def from_quantized(cls, q, scales, zeros, g_idx, bias, bits, group_size, checkpoint_format="gptq"):
        """q (out, in) ints, scales / zeros (out, groups), g_idx (in,): the result of quantize_weight."""
        out_features, in_features = q.shape
        layer = cls(in_features, out_features, bias is not None, bits, group_size, checkpoint_format)
        layer.qweight = pack_rows(q.t().to(torch.int32), bits)
        layer.qzeros = encode_qzeros(zeros.t().to(torch.int32), bits, checkpoint_format)
        layer.scales = scales.t().contiguous().to(torch.float16)
        layer.g_idx = g_idx.to(torch.int32)
        if bias is not None:
            layer.bias = bias.detach().to(torch.float16)
        return layer

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """The (out, in) weight: W^T[i, o] = scales[g, o] * (q[i, o] - zero[g, o]) with g = g_idx[i], computed in
        fp32 (bf16 would drop 3 of the fp16 scale's mantissa bits) and then cast to dtype."""
        q = unpack_rows(self.qweight, self.bits)
        zeros = decode_qzeros(self.qzeros, self.bits, self.checkpoint_format)
        g = self.g_idx.long()
        return (self.scales[g].float() * (q - zeros[g]).float()).t().to(dtype)

    def forward(self, x):
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.dequantize(x.dtype), bias)

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}"


def set_module(root: nn.Module, name: str, module: nn.Module):
    """root.<name> = module, for a dotted name ("model.layers.0.self_attn.q_proj")."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def load_quantized(model: nn.Module, state: dict, quantization_config: dict, tied_head: str | None = None):
    """Loading a GPTQ folder: every Linear with a `qweight` in `state` becomes a QuantLinear, then all tensors
    are loaded (other weights cast to the model's dtype). tied_head: the state key of an output head tied to
    the embedding, which the folder need not store."""
    qc = quantization_config
    method = qc.get("quant_method", qc.get("method"))
    fmt = qc.get("checkpoint_format", qc.get("format", "gptq"))
    if method != "gptq" or fmt not in ("gptq", "gptq_v2") or qc.get("bits") not in BITS \
            or qc.get("pack_dtype", "int32") != "int32":
        raise SystemExit(f"quantization_config: only GPTQ (checkpoint_format gptq / gptq_v2, bits {BITS}, "
                         f"int32 packing) is supported, got {qc}")
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and name + ".qweight" in state:
            set_module(model, name, QuantLinear(m.in_features, m.out_features, m.bias is not None,
                                                 qc["bits"], qc["group_size"], fmt))
    # non-persistent / recomputed buffers of old HF checkpoints
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    expected = set(model.state_dict())
    if tied_head:
        expected.discard(tied_head)  # tied heads are not stored
    missing, unexpected = expected - set(state), set(state) - set(model.state_dict())
    if missing or unexpected:
        raise SystemExit(f"GPTQ weights do not match the config (missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]})")
    # load_state_dict copies into the placeholders: int32 stays int32, scales and bias stay fp16 as in the file
    model.load_state_dict(state, strict=False)
    return model


# ----------------------------------------------------------------------------- the quantization grid

def group_params(w: torch.Tensor, bits: int, sym: bool):
    """Scale and zero point per row of w (out, columns of one group), as in the GPTQ reference quantizer:
    asymmetric: the grid spans [min(w, 0), max(w, 0)], scale = (xmax - xmin) / maxq, zero = round(-xmin / scale);
    symmetric:  the grid spans [-max|w|, max|w|] and zero = (maxq + 1) / 2 (8 for 4 bits).
    The scale is rounded to fp16 here, because that is what the file stores: the algorithm then sees exactly
    the weights that the checkpoint dequantizes to."""
    maxq = 2 ** bits - 1
    xmin = w.min(dim=1).values.clamp(max=0)
    xmax = w.max(dim=1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    flat = (xmax - xmin) == 0  # an all-zero row: any grid works, take [-1, 1]
    xmin, xmax = torch.where(flat, -1.0, xmin), torch.where(flat, 1.0, xmax)
    # times 1/maxq rather than / maxq: torch on CUDA turns a division by a Python number into that product, so
    # written out, the CPU, the GPU and the Triton kernel below all round alike
    scale = ((xmax - xmin) * (1 / maxq)).half().float().clamp(min=2 ** -24)  # 2^-24: the smallest fp16 (subnormal)
    zero = torch.full_like(scale, (maxq + 1) // 2) if sym else torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def quantize_column(w, scale, zero, bits):
    """Round to the grid: q = clamp(round(w / scale) + zero, 0, maxq); returns q and dequantized scale * (q - zero)."""
    q = torch.clamp(torch.round(w / scale) + zero, 0, 2 ** bits - 1)
    return q, scale * (q - zero)


def gptq_block(W1, U1, scales, zeros, group_size, bits, sym):
    """GPTQ inside one block of columns, one column after another (W1 is updated in place). scales / zeros
    (out, groups of this block) are filled at each group's first column; with group_size <= 0 they hold the
    row's one grid already. Returns the block's integer weights and its scaled errors Err (out, block)."""
    Q1, Err = torch.zeros_like(W1), torch.zeros_like(W1)
    for i in range(W1.shape[1]):
        g = i // group_size if group_size > 0 else 0
        if group_size > 0 and i % group_size == 0:  # first column of a group: its grid from the corrected weights
            scales[:, g], zeros[:, g] = group_params(W1[:, i:i + group_size], bits, sym)
        w = W1[:, i]
        Q1[:, i], dq = quantize_column(w, scales[:, g], zeros[:, g], bits)
        Err[:, i] = err = (w - dq) / U1[i, i]
        W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
    return Q1, Err


# The loop above launches a dozen tiny kernels per column; on a GPU that is most of GPTQ's time. Rows are
# independent inside a block (U1 is shared, each row has its own grid and errors), so one Triton program can
# run the same column loop for a tile of rows with the whole tile held in registers: one launch per block.
# It follows gptq_block step for step, with the same roundings (fp16 scales, round half to even, IEEE division,
# no fused multiply-add), so both give the same integers; tests/test_quantize.py checks that on a GPU.
try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def use_triton(W, width):
    """The kernel keeps a tile of rows x (block width rounded up to a power of 2) in registers: up to 256."""
    return triton is not None and W.is_cuda and width <= 256


if triton is not None:
    @triton.jit
    def _round_half_even(x):
        f = tl.floor(x)
        odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
        return tl.where(x - f > 0.5, f + 1.0, tl.where((x - f == 0.5) & odd, f + 1.0, f))

    @triton.jit
    def _gptq_block_kernel(W, U, Q, E, S, Z, rows, width, n_groups, GS: tl.constexpr, C: tl.constexpr,
                           MAXQ: tl.constexpr, SYM: tl.constexpr, BLOCK_R: tl.constexpr):
        # this program: rows r of the block W (rows, width), all its columns c; registers cannot be indexed by a
        # loop variable, so column i is read by masking the tile with c == i and summing over the columns
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        c = tl.arange(0, C)
        tile = (r[:, None] < rows) & (c[None, :] < width)
        w = tl.load(W + r[:, None] * width + c[None, :], mask=tile, other=0.0)  # (rows of this program, block)
        q_out = tl.zeros([BLOCK_R, C], tl.float32)
        e_out = tl.zeros([BLOCK_R, C], tl.float32)
        scale = tl.load(S + r * n_groups, mask=r < rows, other=1.0)  # GS == 0: the row's one grid, given
        zero = tl.load(Z + r * n_groups, mask=r < rows, other=0.0)
        for i in range(width):
            if GS > 0:
                if i % GS == 0:  # group_params on the columns i .. i + GS - 1, as they are now
                    grp = (c[None, :] >= i) & (c[None, :] < i + GS) & tile
                    xmin = tl.minimum(tl.min(tl.where(grp, w, float("inf")), axis=1), 0.0)
                    xmax = tl.maximum(tl.max(tl.where(grp, w, float("-inf")), axis=1), 0.0)
                    if SYM:
                        xmax = tl.maximum(-xmin, xmax)
                        xmin = -xmax
                    flat = (xmax - xmin) == 0.0
                    xmin = tl.where(flat, -1.0, xmin)
                    xmax = tl.where(flat, 1.0, xmax)
                    scale = ((xmax - xmin) * (1.0 / MAXQ)).to(tl.float16).to(tl.float32)
                    scale = tl.maximum(scale, 2.0 ** -24)
                    if SYM:
                        zero = tl.zeros_like(scale) + (MAXQ + 1) // 2
                    else:
                        zero = tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(-xmin, scale)), 0.0), MAXQ)
                    tl.store(S + r * n_groups + i // GS, scale, mask=r < rows)
                    tl.store(Z + r * n_groups + i // GS, zero, mask=r < rows)
            col = c[None, :] == i
            wi = tl.sum(tl.where(col, w, 0.0), axis=1)  # column i
            q = tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(wi, scale)) + zero, 0.0), MAXQ)
            err = tl.math.div_rn(wi - scale * (q - zero), tl.load(U + i * width + i))
            u = tl.load(U + i * width + c, mask=(c >= i) & (c < width), other=0.0)  # row i of U1 from column i on
            w = w - err[:, None] * u[None, :]
            q_out = tl.where(col, q[:, None], q_out)
            e_out = tl.where(col, err[:, None], e_out)
        tl.store(Q + r[:, None] * width + c[None, :], q_out, mask=tile)
        tl.store(E + r[:, None] * width + c[None, :], e_out, mask=tile)


def gptq_block_triton(W1, U1, scales, zeros, group_size, bits, sym):
    """gptq_block as one Triton launch (W1 is not updated: only Q1 and Err leave the kernel)."""
    rows, width = W1.shape
    Q1, Err = torch.empty_like(W1), torch.empty_like(W1)
    S, Z = scales.contiguous(), zeros.contiguous()
    C = triton.next_power_of_2(width)
    BLOCK_R = 32 if C <= 128 else 16
    _gptq_block_kernel[(triton.cdiv(rows, BLOCK_R),)](
        W1.contiguous(), U1.contiguous(), Q1, Err, S, Z, rows, width, S.shape[1], max(group_size, 0), C,
        2 ** bits - 1, sym, BLOCK_R, enable_fp_fusion=False)
    scales.copy_(S)
    zeros.copy_(Z)
    return Q1, Err


# ----------------------------------------------------------------------------- GPTQ for one layer

def round_to_nearest(W, Q, scales, zeros, gs, bits, sym):
    """RTN: each group's grid from its own weights, no error feedback. Fills Q, scales, zeros."""
    for g in range(scales.shape[1]):
        sl = slice(g * gs, (g + 1) * gs)
        scales[:, g], zeros[:, g] = group_params(W[:, sl], bits, sym)
        Q[:, sl] = quantize_column(W[:, sl], scales[:, g:g + 1], zeros[:, g:g + 1], bits)[0]
    return Q.to(torch.int32), scales, zeros, torch.arange(W.shape[1], device=W.device, dtype=torch.int32) // gs


def prepare_hessian(W, H, desc_act, percdamp):
    """W (out, in) and H as GPTQ walks them: dead inputs fixed, columns in act-order, H dampened.
    Returns W, H (permuted copies) and the permutation."""
    H = H.float().clone()
    # dead inputs (a column of X that is always 0) do not affect the output: H[i, i] = 1 keeps H invertible
    # and W[:, i] = 0 quantizes exactly
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    # act-order (desc_act): quantize the inputs with the largest H[i, i] = 2 mean(x_i^2) first, while many
    # columns are still free to absorb their error. Groups are runs of gs consecutive columns in this order,
    # so g_idx (in the original order) is no longer monotone.
    perm = torch.argsort(torch.diag(H), descending=True) if desc_act else torch.arange(W.shape[1], device=W.device)
    W, H = W[:, perm], H[perm][:, perm]

    # dampening: H + lambda I with lambda = percdamp * mean(diag H) keeps the inverse numerically stable
    H.diagonal().add_(percdamp * torch.mean(torch.diag(H)))
    return W, H, perm


@torch.no_grad()
def quantize_weight(W: torch.Tensor, H: torch.Tensor | None, bits=4, group_size=128, sym=True, desc_act=False,
                    percdamp=0.01, blocksize=128):
    """Quantize W (out, in) column by column. With H = 2 X X^T / n (the Hessian of ||W X - Q X||^2 over the
    calibration inputs X, (in, n)) this is GPTQ; with H None it is plain round-to-nearest (RTN).
    Returns q (out, in) ints, scales and zeros (out, groups) and g_idx (in,): the QuantLinear fields."""
    W = W.detach().float().clone()
    rows, cols = W.shape
    gs = group_size if group_size > 0 else cols
    n_groups = math.ceil(cols / gs)
    scales = torch.zeros(rows, n_groups, device=W.device)
    zeros = torch.zeros(rows, n_groups, device=W.device)
    Q = torch.zeros_like(W)
    if H is None:
        return round_to_nearest(W, Q, scales, zeros, gs, bits, sym)
    W, H, perm = prepare_hessian(W, H, desc_act, percdamp)

    # Optimal Brain Quantization: quantizing column j to q_j and then updating the not-yet-quantized columns by
    #     W[:, j+1:] -= (w_j - q_j) / [H^-1]_jj * [H^-1]_{j, j+1:}
    # minimizes ||W X - Q X||^2 given the choice q_j; afterwards row and column j are removed from H^-1.
    # The row j of H^-1 after eliminating columns 0..j-1 is row j of U, the upper Cholesky factor of H^-1
    # (H^-1 = U^T U), scaled by U_jj; so one Cholesky replaces all the eliminations:
    #     err_j = (w_j - q_j) / U_jj,   W[:, j+1:] -= err_j U_{j, j+1:}
    L = torch.linalg.cholesky(H)
    U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)

    # lazy batch updates: run the update inside a block of `blocksize` columns, and apply the block's combined
    # effect on all later columns with one matmul W[:, i2:] -= Err U[i1:i2, i2:] (same result, GPU friendly).
    # A block holds whole groups, so a group's grid is always taken from its up-to-date weights.
    if group_size > 0:
        blocksize = gs * max(1, blocksize // gs)
    else:  # one grid per row, from the weights before any update
        scales[:, 0], zeros[:, 0] = group_params(W, bits, sym)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        groups = slice(i1 // gs, math.ceil(i2 / gs))  # the grids of this block's groups (one with gs = cols)
        block = gptq_block_triton if use_triton(W, i2 - i1) else gptq_block
        Q[:, i1:i2], Err = block(W[:, i1:i2].clone(), U[i1:i2, i1:i2], scales[:, groups], zeros[:, groups],
                                 group_size, bits, sym)
        W[:, i2:] -= Err @ U[i1:i2, i2:]

    inv = torch.argsort(perm)  # back to the original input order
    g_idx = (torch.arange(cols, device=W.device, dtype=torch.int32) // gs)[inv]
    return Q[:, inv].to(torch.int32), scales, zeros, g_idx


def dequantize_weight(q, scales, zeros, g_idx):
    g = g_idx.long()
    return scales[:, g] * (q.float() - zeros[:, g])


def relative_error(W, Wq, H):
    """||W X - Wq X||^2 / ||W X||^2 over the calibration inputs, from H = 2 X X^T / n alone: tr(D H D^T)."""
    D = (W.float() - Wq.float())
    return (torch.sum((D @ H) * D) / torch.sum((W.float() @ H) * W.float())).item()
