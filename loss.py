"""The loss of the output head, without the fp32 logits of the whole batch in memory.

chunked_cross_entropy(h, W, targets) = mean cross-entropy of h @ W^T over targets != -100, computed chunk by
chunk; under autograd LinearCrossEntropy computes the gradients in the same pass (fused linear cross-entropy).
"""
import torch
import torch.nn.functional as F


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
