"""LoRALinear and its autograd Function against float64 references on random data."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora import LoRALinear
from lora.layer import _LoRAFunction

D_IN, D_OUT, R = 24, 16, 4


def make_layer(dtype=torch.float64, bias=True, random_b=True, **kw) -> LoRALinear:
    layer = LoRALinear(nn.Linear(D_IN, D_OUT, bias=bias, dtype=dtype), rank=R, alpha=8.0, **kw)
    if random_b:
        nn.init.normal_(layer.lora_B)
    return layer


def reference(layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    """x W^T + b + s (x A^T) B^T, written out."""
    y = x @ layer.weight.t() + (layer.bias if layer.bias is not None else 0)
    return y + layer.scaling * (x @ layer.lora_A.t()) @ layer.lora_B.t()


@pytest.mark.parametrize("fused", [True, False])
def test_zero_init_b_is_bit_identical(fused):
    base = nn.Linear(D_IN, D_OUT)
    layer = LoRALinear(base, rank=R, alpha=8.0)
    layer.fused = fused
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    x = torch.randn(3, 20, D_IN)
    assert torch.equal(layer(x), base(x))


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("fused", [True, False])
def test_forward_matches_reference(use_rslora, fused):
    layer = make_layer(use_rslora=use_rslora)
    layer.fused = fused
    assert layer.scaling == pytest.approx(8.0 / (math.sqrt(R) if use_rslora else R))
    x = torch.randn(40, D_IN, dtype=torch.float64)
    torch.testing.assert_close(layer(x), reference(layer, x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n_tokens", [40, 2])  # 40 takes the fused Function, 2 the small-batch plain path
def test_gradients_match_reference_autograd(n_tokens):
    layer = make_layer()
    x = torch.randn(n_tokens, D_IN, dtype=torch.float64, requires_grad=True)
    g = torch.randn(n_tokens, D_OUT, dtype=torch.float64)
    (layer(x) * g).sum().backward()
    got = (x.grad, layer.lora_A.grad, layer.lora_B.grad)

    A = layer.lora_A.detach().clone().requires_grad_()
    B = layer.lora_B.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y = x2 @ layer.weight.t() + layer.bias + layer.scaling * (x2 @ A.t()) @ B.t()
    (y * g).sum().backward()
    for a, b in zip(got, (x2.grad, A.grad, B.grad)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert layer.weight.grad is None and layer.bias.grad is None
    assert not layer.weight.requires_grad and not layer.bias.requires_grad


def test_gradcheck_custom_function():
    w = torch.randn(D_OUT, D_IN, dtype=torch.float64)

    def fn(x, b, a_, b_):
        return _LoRAFunction.apply(x, w, b, a_, b_, 1.7, torch.float64)

    args = (
        torch.randn(7, D_IN, dtype=torch.float64, requires_grad=True),
        torch.randn(D_OUT, dtype=torch.float64, requires_grad=True),
        torch.randn(R, D_IN, dtype=torch.float64, requires_grad=True),
        torch.randn(D_OUT, R, dtype=torch.float64, requires_grad=True),
    )
    assert torch.autograd.gradcheck(fn, args)
    # Only some inputs need grads: x frozen (first layer's input), bias absent.
    x = torch.randn(7, D_IN, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda a_, b_: _LoRAFunction.apply(x, w, None, a_, b_, 0.5, torch.float64), args[2:]
    )


def test_trainable_base_weight_falls_back_and_gets_grad():
    layer = make_layer()
    layer.weight.requires_grad_(True)
    x = torch.randn(40, D_IN, dtype=torch.float64)
    layer(x).sum().backward()
    torch.testing.assert_close(layer.weight.grad, torch.ones(40, D_OUT, dtype=torch.float64).t() @ x)


def test_merge_unmerge():
    layer = make_layer()
    x = torch.randn(40, D_IN, dtype=torch.float64)
    w0, y0 = layer.weight.detach().clone(), layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), y0, rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    torch.testing.assert_close(layer.weight, w0, rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


def test_merge_fp32_unmerge_restores_to_fp32_rounding():
    layer = make_layer(dtype=torch.float32)
    w0 = layer.weight.detach().clone()
    layer.merge()
    layer.unmerge()
    torch.testing.assert_close(layer.weight, w0, rtol=0, atol=32 * torch.finfo(torch.float32).eps)


def test_merge_in_bf16_within_bf16_rounding_of_fp32():
    layer32 = make_layer(dtype=torch.float32)
    layer16 = LoRALinear(nn.Linear(D_IN, D_OUT, dtype=torch.bfloat16), rank=R, alpha=8.0)
    with torch.no_grad():
        layer32.weight.copy_(layer32.weight.bfloat16().float())  # same starting weight in both
        layer16.weight.copy_(layer32.weight)
        layer16.lora_A.copy_(layer32.lora_A)
        layer16.lora_B.copy_(layer32.lora_B)
    assert layer16.lora_A.dtype == torch.float32  # fp32 master adapters on a bf16 base
    layer32.merge()
    layer16.merge()
    exact = layer32.weight
    # one rounding to bf16 (8 significant bits): within half an ulp, i.e. 2^-8 relative
    assert ((layer16.weight.float() - exact).abs() <= exact.abs() * 2.0**-8 + 1e-30).all()


def test_merge_non_finite_raises_and_leaves_weight():
    layer = make_layer()
    with torch.no_grad():
        layer.lora_B[0, 0] = float("inf")
    w0 = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge()
    assert torch.equal(layer.weight, w0) and not layer.merged


def test_dropout_only_in_training_and_only_on_lora_path():
    layer = make_layer(dropout=0.5)
    x = torch.randn(40, D_IN, dtype=torch.float64)
    base = F.linear(x, layer.weight, layer.bias)
    torch.manual_seed(1)
    y = layer(x)
    torch.manual_seed(1)
    xd = F.dropout(x, 0.5, training=True)
    torch.testing.assert_close(y, base + layer.scaling * (xd @ layer.lora_A.t()) @ layer.lora_B.t())
    assert not torch.allclose(y, reference(layer, x))
    layer.eval()
    torch.testing.assert_close(layer(x), reference(layer, x), rtol=1e-12, atol=1e-12)
    layer.train()
    nn.init.zeros_(layer.lora_B)  # LoRA path silent -> dropout must not touch the base output
    torch.testing.assert_close(layer(x), base, rtol=0, atol=0)


@pytest.mark.parametrize("fused", [True, False])
def test_autocast_bf16_cpu(fused):
    layer = make_layer(dtype=torch.float32)
    layer.fused = fused
    x = torch.randn(2, 20, D_IN, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    ref = reference(layer, x)
    torch.testing.assert_close(y.float(), ref, rtol=3e-2, atol=3e-2 * ref.abs().max().item())
    y.float().square().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad.dtype == torch.float32
    assert x.grad.dtype == torch.float32
    grads = (x.grad.clone(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone())
    x.grad = layer.lora_A.grad = layer.lora_B.grad = None
    ref.square().sum().backward()
    for got, want in zip(grads, (x.grad, layer.lora_A.grad, layer.lora_B.grad)):
        torch.testing.assert_close(got, want, rtol=5e-2, atol=5e-2 * want.abs().max().item())


@pytest.mark.parametrize("lead", [(30,), (3, 10), (2, 3, 5)])
def test_leading_dims(lead):
    layer = make_layer()
    x = torch.randn(*lead, D_IN, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert y.shape == (*lead, D_OUT)
    torch.testing.assert_close(y, reference(layer, x), rtol=1e-12, atol=1e-12)
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_non_contiguous_input():
    layer = make_layer()
    x = torch.randn(D_IN, 30, dtype=torch.float64).t()
    torch.testing.assert_close(layer(x), reference(layer, x), rtol=1e-12, atol=1e-12)


def test_torch_compile_matches_eager():
    torch._dynamo.reset()
    layer = make_layer(dtype=torch.float32)
    x = torch.randn(4, 16, D_IN, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True)  # fullgraph: the Function must trace without breaks
    y = compiled(x)
    y.square().sum().backward()
    got = (y.detach(), x.grad, layer.lora_A.grad, layer.lora_B.grad)
    x.grad = layer.lora_A.grad = layer.lora_B.grad = None
    y = layer(x)
    y.square().sum().backward()
    for a, b in zip(got, (y.detach(), x.grad, layer.lora_A.grad, layer.lora_B.grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_no_grad_and_frozen_input_paths():
    layer = make_layer()
    x = torch.randn(40, D_IN, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference(layer, x), rtol=1e-12, atol=1e-12)
    layer(x).sum().backward()  # x needs no grad (first layer): only A and B get one
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None and x.grad is None
