"""LoRALinear and its autograd Function against float64 references on random data.

Low-precision behaviour (fp32, autocast, bf16/fp16 bases) against float64 is in test_lora_precision.py.
"""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from lora_helpers import ALPHA, D_IN, D_OUT, RANK, grads_of, random_layer, reference, took_fused_path
from torch import nn

from lora import LoRALinear
from lora.layer import _LoRAFunction

EXACT = dict(rtol=1e-12, atol=1e-12)  # float64 against float64: only summation order differs


def check_grads(got: dict, want: dict, names=("x", "lora_A", "lora_B")) -> None:
    for k in names:
        torch.testing.assert_close(got[k], want[k], **EXACT, msg=lambda m, k=k: f"grad of {k}: {m}")


@pytest.mark.parametrize("fused", [True, False])
def test_zero_init_b_is_bit_identical(fused):
    base = nn.Linear(D_IN, D_OUT)
    layer = LoRALinear(base, rank=RANK, alpha=ALPHA)
    layer.fused = fused
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    x = torch.randn(3, 20, D_IN)
    assert torch.equal(layer(x), base(x))


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_init_distribution_of_a(init):
    """kaiming: U(-1/sqrt(in), 1/sqrt(in)) as nn.Linear; gaussian: N(0, 1/r), PEFT's init_lora_weights='gaussian'."""
    a = LoRALinear(nn.Linear(4096, 8), rank=RANK, init=init).lora_A  # 16k samples: std known to ~1 %
    if init == "kaiming":
        bound = 1 / math.sqrt(4096)
        assert a.abs().max() <= bound and a.abs().max() > 0.99 * bound
        assert a.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.03)
    else:
        assert a.std().item() == pytest.approx(1 / RANK, rel=0.03)
        assert a.abs().max() > 3 / RANK


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("fused", [True, False])
def test_forward_matches_reference(use_rslora, fused):
    layer = random_layer(use_rslora=use_rslora)
    layer.fused = fused
    assert layer.scaling == pytest.approx(ALPHA / (math.sqrt(RANK) if use_rslora else RANK))
    x = torch.randn(40, D_IN, dtype=torch.float64)
    torch.testing.assert_close(layer(x), reference(layer, x)[0], **EXACT)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("n_tokens", [40, 2])  # 40 takes the fused Function, 2 the small-batch plain path
def test_gradients_match_reference_autograd(n_tokens, bias):
    layer = random_layer(bias=bias)
    x = torch.randn(n_tokens, D_IN, dtype=torch.float64, requires_grad=True)
    g = torch.randn(n_tokens, D_OUT, dtype=torch.float64)
    layer(x).backward(g)
    check_grads(grads_of(layer, x), reference(layer, x, g)[1])
    assert layer.weight.grad is None and not layer.weight.requires_grad
    if bias:
        assert layer.bias.grad is None and not layer.bias.requires_grad


@pytest.mark.parametrize(
    "trainable",
    [t for t in itertools.product([False, True], repeat=4) if any(t)],
    ids=lambda t: "".join("xbAB"[i] if on else "-" for i, on in enumerate(t)),
)
def test_fused_gradients_for_any_trainable_subset(trainable):
    """x, bias, A, B each trainable or not (LoRA-FA freezes A; a first layer's x needs none): grads where asked."""
    layer = random_layer()
    x = torch.randn(40, D_IN, dtype=torch.float64)
    for t, on in zip((x, layer.bias, layer.lora_A, layer.lora_B), trainable):
        t.requires_grad_(on)
    g = torch.randn(40, D_OUT, dtype=torch.float64)
    want = reference(layer, x, g)[1]
    y = layer(x)
    assert took_fused_path(y)
    y.backward(g)
    got = grads_of(layer, x)
    for name, on in zip(("x", "bias", "lora_A", "lora_B"), trainable):
        if on:
            torch.testing.assert_close(got[name], want[name], **EXACT)
        else:
            assert got[name] is None, name


def test_path_choice():
    """The fused Function runs from N = in*out/(in+out) tokens on, without dropout in training or a trainable W."""
    layer = LoRALinear(nn.Linear(16, 16, dtype=torch.float64), rank=RANK)  # threshold: 16*16/32 = 8 tokens
    assert took_fused_path(layer(torch.randn(8, 16, dtype=torch.float64)))
    assert not took_fused_path(layer(torch.randn(7, 16, dtype=torch.float64)))
    x = torch.randn(2, 8, 16, dtype=torch.float64)
    layer.fused = False
    assert not took_fused_path(layer(x))
    layer.fused = True
    layer.weight.requires_grad_(True)
    assert not took_fused_path(layer(x))
    layer.weight.requires_grad_(False)
    with_dropout = LoRALinear(nn.Linear(16, 16, dtype=torch.float64), rank=RANK, dropout=0.1)
    assert not took_fused_path(with_dropout(x))
    assert took_fused_path(with_dropout.eval()(x))
    layer.merge()
    assert not took_fused_path(layer(x))


@pytest.mark.parametrize("dtype,lora_dtype", [(torch.float64, torch.float64), (torch.float16, torch.float32)])
def test_adapters_follow_the_base_weight(dtype, lora_dtype):
    """A and B live on the base weight's device (here "meta", as when a model is built before loading) and are
    fp32 masters for a half-precision base; weight and bias stay the very Parameters of the wrapped Linear."""
    base = nn.Linear(D_IN, D_OUT, dtype=dtype, device="meta")
    layer = LoRALinear(base, rank=RANK)
    assert layer.lora_A.device.type == layer.lora_B.device.type == "meta"
    assert layer.lora_A.dtype == layer.lora_B.dtype == lora_dtype
    assert layer.lora_A.shape == (RANK, D_IN) and layer.lora_B.shape == (D_OUT, RANK)
    assert layer.weight is base.weight and layer.bias is base.bias


def test_only_wraps_linear_and_repr():
    with pytest.raises(TypeError) as e:
        LoRALinear(nn.Conv1d(4, 4, 1))
    assert str(e.value) == "LoRALinear wraps an nn.Linear, got Conv1d"
    layer = LoRALinear(nn.Linear(24, 16, bias=False), rank=4, alpha=6.0, use_rslora=True)
    want = "in_features=24, out_features=16, bias=False, rank=4, alpha=6.0, scaling=3, merged={}"
    assert layer.extra_repr() == want.format(False)
    layer.merge()
    assert layer.extra_repr() == want.format(True)
    assert "bias=True" in LoRALinear(nn.Linear(3, 2)).extra_repr()


def test_gradcheck_custom_function(device):
    """Finite differences on small shapes (N=3, in=5, out=4, r=2): every element is perturbed, so keep it small."""
    f64 = dict(dtype=torch.float64, device=device)
    w = torch.randn(4, 5, **f64)

    def fn(x, b, a_, b_):
        return _LoRAFunction.apply(x, w, b, a_, b_, 1.7, torch.float64)

    args = (
        torch.randn(3, 5, **f64, requires_grad=True),
        torch.randn(4, **f64, requires_grad=True),
        torch.randn(2, 5, **f64, requires_grad=True),
        torch.randn(4, 2, **f64, requires_grad=True),
    )
    assert torch.autograd.gradcheck(fn, args)
    # Only some inputs need grads: x frozen (first layer's input), bias absent.
    x = torch.randn(3, 5, **f64)
    assert torch.autograd.gradcheck(
        lambda a_, b_: _LoRAFunction.apply(x, w, None, a_, b_, 0.5, torch.float64), args[2:]
    )


def test_trainable_base_weight_falls_back_and_gets_grad():
    layer = random_layer()
    layer.weight.requires_grad_(True)
    x = torch.randn(40, D_IN, dtype=torch.float64)
    layer(x).sum().backward()
    torch.testing.assert_close(layer.weight.grad, torch.ones(40, D_OUT, dtype=torch.float64).t() @ x)


def test_merge_unmerge():
    layer = random_layer()
    x = torch.randn(40, D_IN, dtype=torch.float64)
    w0, y0 = layer.weight.detach().clone(), layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer.weight, w0 + layer.scaling * layer.lora_B @ layer.lora_A, **EXACT)
    torch.testing.assert_close(layer(x), y0, **EXACT)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.weight, w0, **EXACT)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


def test_merge_fp32_unmerge_restores_to_fp32_rounding():
    layer = random_layer(dtype=torch.float32)
    w0 = layer.weight.detach().clone()
    layer.merge()
    layer.unmerge()
    torch.testing.assert_close(layer.weight, w0, rtol=0, atol=32 * torch.finfo(torch.float32).eps)


def test_merge_unmerge_in_bf16_within_one_rounding(device):
    """A bf16 base with fp32 adapters: W + s B A is formed in fp32 and rounded to bf16 once, each way.

    Bounds from round-to-nearest (u = 2^-8 for bf16), not from a measurement: merge is within u |W1| of the
    float64 sum; unmerge within u |W1| + u |W0| of the original W0. Over 200 seeds the worst element used
    99.4 % and 97.6 % of these bounds.
    """
    u = torch.finfo(torch.bfloat16).eps / 2
    layer = random_layer(dtype=torch.bfloat16, device=device)
    assert layer.lora_A.dtype == torch.float32  # fp32 master adapters on a bf16 base
    w0 = layer.weight.detach().double()
    exact = w0 + layer.scaling * layer.lora_B.double() @ layer.lora_A.double()
    layer.merge()
    w1 = layer.weight.detach().double()
    assert layer.weight.dtype == torch.bfloat16
    assert ((w1 - exact).abs() <= u * exact.abs()).all()
    layer.unmerge()
    assert ((layer.weight.double() - w0).abs() <= u * (w1.abs() + w0.abs())).all()


def test_merge_non_finite_raises_and_leaves_weight():
    layer = random_layer()
    with torch.no_grad():
        layer.lora_B[0, 0] = float("inf")
    w0 = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge()
    assert torch.equal(layer.weight, w0) and not layer.merged


def test_dropout_only_in_training_and_only_on_lora_path():
    layer = random_layer(dropout=0.5)
    x = torch.randn(40, D_IN, dtype=torch.float64)
    base = F.linear(x, layer.weight, layer.bias)
    torch.manual_seed(1)
    y = layer(x)
    torch.manual_seed(1)
    xd = F.dropout(x, 0.5, training=True)
    torch.testing.assert_close(y, base + layer.scaling * (xd @ layer.lora_A.t()) @ layer.lora_B.t())
    assert not torch.allclose(y, reference(layer, x)[0])
    layer.eval()
    torch.testing.assert_close(layer(x), reference(layer, x)[0], **EXACT)
    layer.train()
    nn.init.zeros_(layer.lora_B)  # LoRA path silent -> dropout must not touch the base output
    torch.testing.assert_close(layer(x), base, rtol=0, atol=0)


@pytest.mark.parametrize("lead", [(30,), (3, 10), (2, 3, 5), (1, 2)])  # (1, 2): 2 tokens, the plain path
def test_leading_dims(lead):
    layer = random_layer()
    x = torch.randn(*lead, D_IN, dtype=torch.float64, requires_grad=True)
    g = torch.randn(*lead, D_OUT, dtype=torch.float64)
    want_y, want = reference(layer, x, g)
    y = layer(x)
    assert y.shape == (*lead, D_OUT)
    torch.testing.assert_close(y, want_y, **EXACT)
    y.backward(g)
    check_grads(grads_of(layer, x), want)


def test_non_contiguous_input():
    layer = random_layer()
    x = torch.randn(D_IN, 30, dtype=torch.float64).t()
    torch.testing.assert_close(layer(x), reference(layer, x)[0], **EXACT)


@pytest.mark.slow
def test_torch_compile_matches_eager():
    torch._dynamo.reset()
    layer = random_layer(dtype=torch.float32)
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
    layer = random_layer()
    x = torch.randn(40, D_IN, dtype=torch.float64)  # needs no grad, as a first layer's input
    g = torch.randn(40, D_OUT, dtype=torch.float64)
    want_y, want = reference(layer, x, g)
    with torch.no_grad():
        y = layer(x)
    assert not y.requires_grad
    torch.testing.assert_close(y, want_y, **EXACT)
    layer(x).backward(g)  # only A and B get a grad
    check_grads(grads_of(layer, x), want, names=("lora_A", "lora_B"))
    assert x.grad is None and layer.weight.grad is None


def saved_shapes(layer: LoRALinear, x: torch.Tensor) -> list[tuple[int, ...]]:
    """Shapes of the tensors autograd keeps for the layer's backward that cost memory: the layer's own parameters
    (resident anyway) are left out."""
    params = {p.data_ptr() for p in layer.parameters()}
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in params:
            saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return saved


def test_fused_path_saves_only_what_its_backward_needs():
    """x and h = s x A^T, only when A or B need a gradient; never an (out, in) tensor: W_eff is merged again in
    backward (at a few hundred tokens per step it would be as large as the activations)."""
    layer = random_layer()
    x_saved, h = (40, D_IN), (40, RANK)
    both = saved_shapes(layer, torch.randn(40, D_IN, dtype=torch.float64, requires_grad=True))
    assert sorted(both) == sorted([x_saved, h])
    assert sorted(saved_shapes(layer, torch.randn(40, D_IN, dtype=torch.float64))) == sorted([x_saved, h])
    layer.lora_A.requires_grad_(False), layer.lora_B.requires_grad_(False)
    assert saved_shapes(layer, torch.randn(40, D_IN, dtype=torch.float64, requires_grad=True)) == []


def test_constructor_defaults_are_the_documented_ones():
    layer = LoRALinear(nn.Linear(D_IN, D_OUT))
    assert (layer.rank, layer.alpha, layer.scaling, layer.use_rslora, layer.init) == (8, 16.0, 2.0, False, "kaiming")
    assert isinstance(layer.dropout, nn.Identity)
