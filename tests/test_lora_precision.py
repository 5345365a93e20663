"""LoRALinear in fp32, under bf16/fp16 autocast and on a bf16/fp16 base, against float64, on every device.

A low-precision result is compared with float64 math on the very values the layer computes with (x, W, b,
A, B and the upstream grad rounded to the compute dtype), so what is left is the layer's own arithmetic:
roundings of W_eff, of the output and of the GEMMs' results. The error is measured as max|got - want| /
max|want| in units of the dtype's unit roundoff u = eps/2, worst over SEEDS; each tolerance is the worst
figure measured on CPU (torch 2.13, 2 cores) times a margin of 2, stated next to it.
"""

from __future__ import annotations

import pytest
import torch
from lora_helpers import D_IN, D_OUT, GRAD_NAMES, grads_of, random_layer, reference, rel_err, took_fused_path

from lora import LoRALinear

SEEDS = range(20)
LOW = [torch.bfloat16, torch.float16]


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def run(layer: LoRALinear, dtype: torch.dtype, autocast: bool, seed: int) -> tuple[dict, dict]:
    """Forward + backward of 40 tokens (the fused path's size) with a random upstream grad; (got, want)."""
    device = layer.weight.device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x_dtype = torch.float32 if autocast else dtype
    x = torch.randn(2, 20, D_IN, generator=gen).to(device, x_dtype).requires_grad_()  # (B, T, in)
    g = torch.randn(2, 20, D_OUT, generator=gen).to(device)  # (B, T, out)
    with torch.autocast(device.type, dtype=dtype, enabled=autocast):
        y = layer(x)
    assert took_fused_path(y) == layer.fused, "the test did not take the path it names"
    y.backward(g.to(y.dtype))
    want_y, want = reference(layer, x, g, round_to=dtype)
    return {"y": y, **grads_of(layer, x)}, {"y": want_y, **want}


def worst_errors(make, dtype: torch.dtype, autocast: bool, fused: bool, seeds=SEEDS) -> dict[str, float]:
    """Worst rel_err over the seeds, in units of u, for y and each grad; make() builds the layer."""
    worst = dict.fromkeys(("y", *GRAD_NAMES), 0.0)
    for seed in seeds:
        torch.manual_seed(seed)
        layer = make()
        layer.fused = fused
        layer.bias.requires_grad_(True)  # as with bias="lora_only": its grad is checked too
        got, want = run(layer, dtype, autocast, seed)
        for k in worst:
            worst[k] = max(worst[k], rel_err(got[k], want[k]) / unit_roundoff(dtype))
    return worst


class _ForgetsBiasUnderAutocast(LoRALinear):
    """A plausible bug: the low-precision path drops the bias (addmm written as mm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y - self.bias.to(y.dtype) if torch.is_autocast_enabled(x.device.type) else y


def _forgets_scaling(dtype: torch.dtype, device: torch.device) -> LoRALinear:
    """A plausible bug: the layer uses s = 1 instead of alpha / rank (= 2 here)."""
    layer = random_layer(dtype, device)
    layer.scaling = 1.0
    return layer


def _forgets_bias(dtype: torch.dtype, device: torch.device) -> LoRALinear:
    layer = random_layer(dtype, device)
    layer.__class__ = _ForgetsBiasUnderAutocast
    return layer


# Worst over 20 seeds on CPU, in units of u, fused / plain path:
#   bf16: y 1.32 / 1.32, grad_x 1.25 / 1.53, grad_b 0.78 / 0.78, grad_A 1.24 / 1.24, grad_B 0.89 / 0.89
#   fp16: y 1.45 / 1.63, grad_x 1.27 / 1.71, grad_b 0.79 / 0.79, grad_A 1.14 / 1.14, grad_B 1.09 / 1.09
# Tolerance: 1.71 u x margin 2 = 3.4 u (bf16: 1.3e-2, fp16: 1.7e-3 of max|want|). The old allowance, rtol =
# atol = 3e-2 max|want| on fp32 inputs, was 10x what correct code used (9.4 % at most over 20 seeds) and passed
# a layer that drops its bias in 20 of 20 seeds; such a layer is now off by 97 u (bf16), see below.
AUTOCAST_TOL_U = 3.4


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_autocast_matches_rounded_float64(device, dtype, fused):
    worst = worst_errors(lambda: random_layer(torch.float32, device), dtype, autocast=True, fused=fused)
    assert max(worst.values()) <= AUTOCAST_TOL_U, worst


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_autocast_dtypes(device, dtype):
    """Autocast output in its dtype; grads in each input's own dtype (fp32 masters get fp32 grads)."""
    layer = random_layer(torch.float32, device)
    layer.bias.requires_grad_(True)
    got, _ = run(layer, dtype, autocast=True, seed=0)
    assert got["y"].dtype == dtype
    assert all(got[k].dtype == torch.float32 for k in GRAD_NAMES)


@pytest.mark.parametrize("mutant", [_forgets_bias, _forgets_scaling], ids=["drops-bias", "drops-scaling"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_autocast_check_catches_a_wrong_layer(dtype, fused, mutant):
    """The tolerance above fails layers with plausible bugs, by far (on CPU; two seeds are plenty)."""
    cpu = torch.device("cpu")
    worst = worst_errors(lambda: mutant(torch.float32, cpu), dtype, autocast=True, fused=fused, seeds=range(2))
    assert worst["y"] > 10 * AUTOCAST_TOL_U, worst


# fp32 (the CPU default) against float64 on the same fp32 values. Worst over 20 seeds on CPU, in units of
# u = 2^-24, fused path: y 3.61, grad_x 3.74, grad_b 2.10, grad_A 4.58, grad_B 4.45. Tolerance: 4.58 u x 2 = 9.2 u.
FP32_TOL_U = 9.2


def test_fp32_fused_matches_float64(device):
    worst = worst_errors(lambda: random_layer(torch.float32, device), torch.float32, autocast=False, fused=True)
    assert max(worst.values()) <= FP32_TOL_U, worst


# A bf16 / fp16 base weight (model.to(dtype) before inject_lora) with fp32 master adapters, no autocast: the
# reference rounds A and B to the base dtype too, which the fused path does not (it rounds W + s B A once).
# Worst over 20 seeds on CPU, in units of u, fused / plain:
#   bf16: y 1.32 / 1.32, grad_x 1.40 / 1.53, grad_b 0.78 / 0.78, grad_A 1.24 / 1.24, grad_B 0.89 / 0.89
#   fp16: y 1.59 / 1.63, grad_x 1.24 / 1.71, grad_b 0.79 / 0.79, grad_A 1.14 / 1.14, grad_B 1.09 / 1.09
# Tolerance: 1.71 u x margin 2 = 3.4 u.
LOW_BASE_TOL_U = 3.4


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_low_precision_base_with_fp32_adapters(device, dtype, fused):
    layer = random_layer(dtype, device)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    worst = worst_errors(lambda: random_layer(dtype, device), dtype, autocast=False, fused=fused)
    assert max(worst.values()) <= LOW_BASE_TOL_U, worst
    layer.bias.requires_grad_(True)
    got, _ = run(layer, dtype, autocast=False, seed=0)
    assert got["y"].dtype == got["x"].dtype == got["bias"].dtype == dtype
    assert got["lora_A"].dtype == got["lora_B"].dtype == torch.float32
