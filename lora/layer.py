"""LoRALinear: a frozen nn.Linear plus a trainable low-rank update, y = x W^T + b + s (x A^T) B^T.

The training step runs through `_LoRAFunction`, which evaluates the same math as
    W_eff = W + s B A                    (out, in)   -- a tiny GEMM, out*in*r flops
    y     = x W_eff^T + b                (N, out)    -- the one big forward GEMM, as plain nn.Linear
    grad_x = g W_eff                     (N, in)     -- the one big backward GEMM, as plain nn.Linear
so the low-rank term never makes a pass over an (N, out) or (N, in) tensor of its own: the only
extra traffic is reading x once more (h = x A^T) in forward and g twice + x once (for grad_B, grad_A)
in backward, all thin GEMMs with rank-wide outputs. This beats both the two-matmul form and the
stacked [W; A] GEMM once N is larger than about d/2 tokens (the merge costs O(out*in*r), the
additive form O(N*(in+out)*r) plus two full passes over y / grad_x); for smaller N (generation)
the plain two-matmul path is used. bench/NOTES.md has the measurements.
Under autocast W_eff is rounded once to bf16/fp16 like the base weight, so the low-rank term shares
the base weight's rounding (2^-9 of |W| for bf16) instead of being rounded on its own.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import LoRAConfig

_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)
LAYER_OPTIONS = ("rank", "alpha", "dropout", "use_rslora", "init")  # the LoRAConfig fields one layer uses


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype nn.Linear would compute in: autocast's dtype when autocast is on for x's device and casts x's
    dtype (float32/16, bfloat16; a float64 input stays float64), else x's."""
    device_type = x.device.type
    if x.dtype in _AUTOCAST_ELIGIBLE and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _merged_weight(
    weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, dtype: torch.dtype
) -> torch.Tensor:
    """W + s B A computed in the params' precision (fp32 for fp32/bf16 bases), rounded once to `dtype`."""
    master = torch.promote_types(weight.dtype, lora_A.dtype)
    w = weight.to(master, copy=True).addmm_(lora_B.to(master), lora_A.to(master), alpha=scaling)
    return w.to(dtype)


class _LoRAFunction(torch.autograd.Function):
    """Forward and backward of a LoRA linear with a frozen W, computing only the gradients asked for.

    x: (N, in), weight: (out, in) frozen, bias: (out,) or None, lora_A: (r, in), lora_B: (out, r).
    Everything is computed in `dtype` (autocast's, or x's); grads come back in each input's own
    dtype, so fp32 master A/B get fp32 grads.
    """

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        scaling: float,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        xc = x.to(dtype)  # (N, in)
        w_eff = _merged_weight(weight, lora_A, lora_B, scaling, dtype)  # (out, in)
        if bias is None:
            y = xc @ w_eff.t()  # (N, out)
        else:
            y = torch.addmm(bias.to(dtype), xc, w_eff.t())  # (N, out)
        need_x, need_lora = ctx.needs_input_grad[0], ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        # h = s x A^T, kept for grad_B; the only extra read of x in forward.
        h = xc @ (lora_A * scaling).to(dtype).t() if need_lora else None  # (N, r)
        # W_eff is merged again in backward, not kept: an (out, in) tensor per layer is as large as the
        # activations at a few hundred tokens per step (SmolLM2's MLP: out 1536), and the merge is a small
        # share of the layer's GEMMs (r/N of their flops). Saving the parameters costs no memory.
        ctx.save_for_backward(xc if need_lora else None, weight if need_x else None, lora_A, lora_B, h)
        ctx.scaling, ctx.dtype, ctx.x_dtype, ctx.A_dtype = scaling, dtype, x.dtype, lora_A.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        xc, weight, lora_A, lora_B, h = ctx.saved_tensors
        need_x, _, need_bias, need_A, need_B = ctx.needs_input_grad[:5]
        s, dtype = ctx.scaling, ctx.dtype
        g = g.to(dtype)  # (N, out)
        grad_x = grad_bias = grad_A = grad_B = None
        if need_x:
            w_eff = _merged_weight(weight, lora_A, lora_B, s, dtype)  # (out, in), the forward's bits
            grad_x = (g @ w_eff).to(ctx.x_dtype)  # (N, in)
        # Thin GEMMs are written as (thin^T @ big): MKL is several times slower on (big^T @ thin)
        # at some ranks (r=8) and never faster by much (bench/NOTES.md).
        if need_A:
            gb = g @ (lora_B * s).to(dtype)  # (N, r)
            grad_A = (gb.t() @ xc).to(ctx.A_dtype)  # (r, in)
        if need_B:
            grad_B = (h.t() @ g).t().to(lora_B.dtype)  # (out, r)
        if need_bias:
            grad_bias = g.sum(0).to(ctx.bias_dtype)  # (out,)
        return grad_x, None, grad_bias, grad_A, grad_B, None, None


class LoRALinear(nn.Module):
    """A frozen Linear (`weight`, `bias`: same names and state-dict keys) plus `lora_A`, `lora_B`.

    Built from an existing nn.Linear and sharing its Parameter objects, so weight tying and base
    checkpoints keep working. lora_A: (rank, in) random init, lora_B: (out, rank) zeros, so the output
    equals the base layer's at step 0. A/B are fp32 masters when the base is fp16/bf16.
    Set `fused = False` to run the plain two-matmul autograd path instead of the custom Function.
    """

    fused: bool = True

    def __init__(self, base: nn.Linear, config: LoRAConfig | None = None, **options: Any) -> None:
        """`config` (LoRAConfig's defaults when None) with `options` among LAYER_OPTIONS overriding it, e.g.
        LoRALinear(linear, rank=4, alpha=8.0). The config's target fields play no part in one layer."""
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        unknown = sorted(set(options) - set(LAYER_OPTIONS))
        if unknown:
            raise TypeError(f"LoRALinear got unknown options {unknown}; it takes {', '.join(LAYER_OPTIONS)}")
        cfg = dataclasses.replace(config or LoRAConfig(), **options)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.use_rslora, self.init = cfg.rank, cfg.alpha, cfg.use_rslora, cfg.init
        self.scaling = cfg.scaling
        self.weight = base.weight.requires_grad_(False)  # (out, in)
        self.bias = base.bias.requires_grad_(False) if base.bias is not None else None  # (out,)
        w = base.weight
        lora_dtype = w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32
        self.lora_A = nn.Parameter(torch.empty(cfg.rank, self.in_features, device=w.device, dtype=lora_dtype))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, cfg.rank, device=w.device, dtype=lora_dtype))
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.merged = False
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A: kaiming-uniform (a=sqrt(5), as nn.Linear) or N(0, 1/r) (PEFT's "gaussian"); B: zeros."""
        if self.init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        else:
            nn.init.normal_(self.lora_A, std=1.0 / self.rank)
        nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        dtype = _compute_dtype(x)
        n_tokens = x.numel() // self.in_features
        dropout_on = self.training and isinstance(self.dropout, nn.Dropout)
        big_batch = n_tokens * (self.in_features + self.out_features) >= self.in_features * self.out_features
        if self.fused and big_batch and not dropout_on and not self.weight.requires_grad:
            y = _LoRAFunction.apply(
                x.reshape(-1, self.in_features), self.weight, self.bias, self.lora_A, self.lora_B, self.scaling, dtype
            )
            return y.view(*x.shape[:-1], self.out_features)
        # Plain autograd: dropout on the LoRA input only, small batches, or a trainable base weight.
        lora = F.linear(F.linear(self.dropout(x), self.lora_A.to(dtype)), self.lora_B.to(dtype))
        return F.linear(x, self.weight, self.bias) + lora * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold s B A into weight (in fp32, cast once); forward is then a plain Linear."""
        if self.merged:
            raise RuntimeError("LoRALinear is already merged; call unmerge() first")
        w = _merged_weight(self.weight, self.lora_A, self.lora_B, self.scaling, self.weight.dtype)
        if not torch.isfinite(w).all():
            raise ValueError(
                "merging LoRA gives a non-finite weight (lora_A/lora_B hold inf/nan or overflow "
                f"{self.weight.dtype}); the weight was left unchanged"
            )
        self.weight.copy_(w)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract s B A again; restores the weight to fp32 rounding."""
        if not self.merged:
            raise RuntimeError("LoRALinear is not merged; nothing to unmerge")
        self.weight.copy_(_merged_weight(self.weight, self.lora_A, self.lora_B, -self.scaling, self.weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:.4g}, merged={self.merged}"
        )
