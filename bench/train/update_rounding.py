"""`python -m bench.train.update_rounding`: how much of a small LoRA update reaches a layer's output under bf16.

The fused path merges W_eff = W + s·B·A and rounds it to bf16 once: an update below half a bf16 ulp of |W| is lost
for every token alike (a bias). The two-matmul path adds s·(x A^T) B^T to x W^T and rounds the sum per output
element (noise that differs token by token). This runs both real LoRALinear paths under bf16 autocast with a bf16
frozen weight (as the lab trains), for updates of growing size relative to W, and compares the update that reaches
the output, y(W, A, B) - y(W, A, 0), with its exact value x (s B A)^T in float64:

- gain: <applied, exact> / <exact, exact>, the share of the update that gets through on average (1: all of it);
- error: |applied - exact| / |exact|.

No timing: deterministic, seconds of CPU. Shapes default to the built-in base (d 256) and SmolLM2-135M (d 576).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from lora import LoRALinear
from training.precision import keep_frozen_in


def applied_update(layer: LoRALinear, x: torch.Tensor, fused: bool) -> torch.Tensor:
    """y(W, A, B) - y(W, A, 0) in float64, both outputs from the layer's own path under bf16 autocast."""
    layer.fused = fused
    saved = layer.lora_B.detach().clone()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x).double()
        layer.lora_B.zero_()
        y0 = layer(x).double()
        layer.lora_B.copy_(saved)
    return y - y0


def measure(d: int, ratio: float, tokens: int, rank: int, seed: int) -> dict[str, float]:
    """gain and error of each path for an update s·B·A whose rms is `ratio` times W's (W ~ N(0, 0.02))."""
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(d, d, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(d, d, generator=g) * 0.02)
    layer = LoRALinear(linear, rank=rank, alpha=2.0 * rank)
    keep_frozen_in(layer, torch.bfloat16)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(d, rank, generator=g))
        delta = layer.scaling * layer.lora_B.double() @ layer.lora_A.double()
        layer.lora_B.mul_(ratio * 0.02 / delta.pow(2).mean().sqrt().item())
        delta = layer.scaling * layer.lora_B.double() @ layer.lora_A.double()
    x = torch.randn(tokens, d, generator=g)
    exact = x.to(torch.bfloat16).double() @ delta.t()  # the input as both paths see it (rounded to bf16)
    out = {}
    for name, fused in (("fused", True), ("two_matmul", False)):
        got = applied_update(layer, x, fused)
        out[f"{name}_gain"] = ((got * exact).sum() / (exact * exact).sum()).item()
        out[f"{name}_error"] = ((got - exact).norm() / exact.norm()).item()
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m bench.train.update_rounding", description=__doc__.split("\n")[0])
    p.add_argument("--dims", type=int, nargs="+", default=[256, 576])
    p.add_argument("--ratios", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print("rms(s·B·A)/rms(W)   d  | fused: gain  error | two-matmul: gain  error")
    rows = []
    for d in args.dims:
        for ratio in args.ratios:
            r = measure(d, ratio, args.tokens, args.rank, args.seed) | {"d": d, "ratio": ratio}
            rows.append(r)
            print(
                f"{ratio:18.0e} {d:4d}  |   {r['fused_gain']:6.3f} {r['fused_error']:6.3f} |"
                f"        {r['two_matmul_gain']:6.3f} {r['two_matmul_error']:6.3f}",
                flush=True,
            )
    return rows


if __name__ == "__main__":
    main()
