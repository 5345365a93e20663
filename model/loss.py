"""Memory-lean cross-entropy of a linear head: mean CE(hidden @ weight.T, targets) without ever holding the
full (tokens x vocab) logits. Tokens go through the head in chunks; each chunk's logits live only while that
chunk is processed.

Design choice: when a gradient is needed, each chunk's gradient (softmax - onehot) is pushed through the head
right there in forward, and backward only scales the stored grad_hidden (N, d) / grad_weight (V, d) by the
incoming scalar. That is the same memory as saving `hidden` for a recompute in backward (N x d either way),
but it does the head GEMM twice (logits, grad_hidden) instead of three times (logits, recomputed logits,
grad_hidden) — the head is a large share of a small model's FLOPs. The price: the loss must be a scalar
(it is) and double backward is unsupported. grad_weight is only formed when the head requires grad (it is
frozen under LoRA)."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

LOGITS_BUDGET = 1 << 24  # elements of float32 logits per chunk (64 MiB) when chunk_size is not given
# On CPU at most this many tokens per chunk as well: the softmax's passes then run over a few MiB that stay in
# cache instead of 64 MiB fetched from memory (and page-faulted anew each call); bench/NOTES.md has the figures.
CPU_CHUNK_TOKENS = 256


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size: int, ignore_index: int, with_grad: bool):
        # hidden (N, d), weight (V, d) of one dtype; targets (N,) int64
        need_h = with_grad and ctx.needs_input_grad[0]
        need_w = with_grad and ctx.needs_input_grad[1]
        acc = torch.promote_types(hidden.dtype, torch.float32)  # float32, or float64 for float64 inputs
        valid = targets != ignore_index  # (N,)
        safe_targets = targets.masked_fill(~valid, 0)[:, None]  # (N, 1) gather-able indices
        n_valid = valid.sum()  # stays on device: no host sync
        loss_sum = torch.zeros((), dtype=acc, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        for s in range(0, hidden.shape[0], chunk_size):
            h, t, m = hidden[s : s + chunk_size], safe_targets[s : s + chunk_size], valid[s : s + chunk_size]
            logits = (h @ weight.t()).to(acc)  # (c, V): the only per-chunk logits
            if need_h or need_w:
                # Softmax in place with a single exp pass (exp dominates: log_softmax then exp_ computes it twice).
                target_logit = logits.gather(1, t).squeeze(1)  # (c,)
                top = logits.amax(dim=-1, keepdim=True)  # (c, 1)
                p = logits.sub_(top).exp_()  # unnormalized, in place
                total = p.sum(dim=-1, keepdim=True)  # (c, 1), >= 1
                nll = total.log().squeeze(1) + top.squeeze(1) - target_logit
                p.div_(total)  # softmax
                p.scatter_add_(1, t, -m[:, None].to(acc))  # - onehot(target), only where valid
                p = p.mul_(m[:, None]).to(hidden.dtype)  # ignored rows get no gradient
                if need_h:
                    torch.mm(p, weight, out=grad_h[s : s + chunk_size])  # (c, d), written in place
                if need_w and p.dtype == acc:
                    grad_w.addmm_(p.t(), h)  # (V, d), accumulated in place
                elif need_w:
                    grad_w += (p.t() @ h).to(acc)  # low-precision GEMM, float32 accumulation
            else:
                nll = logits.logsumexp(dim=-1) - logits.gather(1, t).squeeze(1)
            loss_sum += (nll * m).sum()
        ctx.save_for_backward(grad_h, grad_w, n_valid)
        ctx.weight_dtype = weight.dtype
        return loss_sum / n_valid  # nan if every target is ignored, as F.cross_entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        grad_h, grad_w, n_valid = ctx.saved_tensors
        scale = grad_out / n_valid
        gh = None if grad_h is None else (grad_h * scale).to(grad_h.dtype)
        gw = None if grad_w is None else (grad_w * scale).to(ctx.weight_dtype)
        return gh, gw, None, None, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor,  # (N, d)
    weight: torch.Tensor,  # (V, d), the head (no bias)
    targets: torch.Tensor,  # (N,) int64, ignore_index where no loss
    chunk_size: int | None = None,  # tokens per chunk; None -> about 64 MiB of float32 logits, on CPU <= 256
    ignore_index: int = -100,
) -> torch.Tensor:
    """Scalar mean cross-entropy over non-ignored targets, equal to
    F.cross_entropy(hidden @ weight.T, targets, ignore_index=ignore_index). Under autocast the head GEMMs run
    in the autocast dtype; logsumexp and softmax are always float32 (float64 for float64 inputs)."""
    if hidden.dim() != 2 or weight.dim() != 2 or targets.dim() != 1:
        raise ValueError(
            f"expected hidden (N, d), weight (V, d), targets (N,); got {tuple(hidden.shape)}, "
            f"{tuple(weight.shape)}, {tuple(targets.shape)}"
        )
    if hidden.shape[0] != targets.shape[0] or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"shape mismatch: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, "
            f"targets {tuple(targets.shape)}"
        )
    device_type = hidden.device.type
    if chunk_size is None:
        chunk_size = max(1, LOGITS_BUDGET // weight.shape[0])
        if device_type == "cpu":
            chunk_size = min(chunk_size, CPU_CHUNK_TOKENS)
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = torch.promote_types(hidden.dtype, weight.dtype)
    with_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    with torch.autocast(device_type, enabled=False):
        return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk_size, ignore_index, with_grad)
