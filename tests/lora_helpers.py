"""Shared by the LoRA tests: a module tree named like the GPT, random LoRA layers, and the float64 reference."""

from __future__ import annotations

import math

import torch
from torch import nn

from lora import LoRALinear

D_IN, D_OUT, RANK, ALPHA = 24, 16, 4, 8.0  # scaling alpha/rank = 2: a dropped scaling changes the output
GRAD_NAMES = ("x", "bias", "lora_A", "lora_B")


class Tiny(nn.Module):
    """A module tree named like the GPT: layers.N.self_attn.{q,v,xq}_proj, layers.N.fc1/fc2, lm_head (tied or not)."""

    def __init__(self, vocab: int = 11, d: int = 8, tie: bool = False):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([Block(d) for _ in range(2)])
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)  # (B, T, d)
        for b in self.layers:
            a = b.self_attn
            x = a.norm(x + a.q_proj(x) + a.v_proj(x) + a.xq_proj(x))
            x = x + b.fc2(torch.relu(b.fc1(x)))
        return self.lm_head(x)  # (B, T, vocab)


class Attn(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.q_proj, self.v_proj, self.xq_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.self_attn = Attn(d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)


def random_layer(
    dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu", bias: bool = True, **kw
) -> LoRALinear:
    """A LoRALinear in which every term of y is random and O(1), so dropping any one of them shows.

    W ~ N(0, 1/in), b ~ N(0, 1), A ~ N(0, 1/in), B ~ N(0, 1/r) (B is zeros after a real init). The bias is
    left frozen, as inject_lora leaves it; tests that check its gradient switch it on.
    """
    layer = LoRALinear(nn.Linear(D_IN, D_OUT, bias=bias, dtype=dtype, device=device), rank=RANK, alpha=ALPHA, **kw)
    with torch.no_grad():
        layer.weight.normal_(std=D_IN**-0.5)
        if bias:
            layer.bias.normal_()
        layer.lora_A.normal_(std=D_IN**-0.5)
        layer.lora_B.normal_(std=RANK**-0.5)
    return layer


def reference(
    layer: LoRALinear, x: torch.Tensor, g: torch.Tensor | None = None, round_to: torch.dtype | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """y = x W^T + b + s (x A^T) B^T in float64, and the grads of sum(y * g) for x, bias, lora_A, lora_B.

    round_to: first round every input (x, W, b, A, B, g) to this dtype, i.e. the values a low-precision
    layer actually computes with; what remains is the error of its arithmetic. The scaling is derived
    from alpha and rank here, not read from the layer.
    """

    def leaf(t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        return (t.to(round_to) if round_to is not None else t).double().requires_grad_()

    s = layer.alpha / (math.sqrt(layer.rank) if layer.use_rslora else layer.rank)
    x64, w, a, b_ = leaf(x), leaf(layer.weight), leaf(layer.lora_A), leaf(layer.lora_B)
    bias = leaf(layer.bias) if layer.bias is not None else None
    y = x64 @ w.t() + s * (x64 @ a.t()) @ b_.t()  # (..., out)
    if bias is not None:
        y = y + bias
    if g is None:
        return y.detach(), {}
    y.backward(leaf(g).detach())
    grads = {"x": x64.grad, "lora_A": a.grad, "lora_B": b_.grad}
    if bias is not None:
        grads["bias"] = bias.grad
    return y.detach(), grads


def grads_of(layer: LoRALinear, x: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """The grads autograd left on x and on the layer's bias, lora_A and lora_B (None where there is none)."""
    bias_grad = layer.bias.grad if layer.bias is not None else None
    return {"x": x.grad, "bias": bias_grad, "lora_A": layer.lora_A.grad, "lora_B": layer.lora_B.grad}


def took_fused_path(y: torch.Tensor) -> bool:
    """Whether y's autograd graph holds the custom Function (it sits under a view / reshape node)."""
    nodes, seen = [y.grad_fn], set()
    while nodes:
        node = nodes.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "_LoRAFunctionBackward":
            return True
        nodes.extend(n for n, _ in node.next_functions)
    return False


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|: the error as a share of the tensor's scale (want is float64)."""
    return ((got.double() - want).abs().max() / want.abs().max()).item()
