"""The chunked cross-entropy against F.cross_entropy in float64, and gradcheck."""

import pytest
import torch
import torch.nn.functional as F

from model import GPT, GPTConfig
from model.loss import chunked_cross_entropy


def data(N=23, d=8, V=13, ignore=(2, 5, 6)):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, d, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(V, d, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randint(0, V, (N,), generator=g)
    t[list(ignore)] = -100
    return h, w, t


@pytest.mark.parametrize("chunk", [1, 5, 23, 64, None])
def test_matches_cross_entropy_value_and_grads(chunk):
    h, w, t = data()
    ref = F.cross_entropy(h @ w.t(), t, ignore_index=-100)
    gh, gw = torch.autograd.grad(ref * 1.7, (h, w))
    got = chunked_cross_entropy(h, w, t, chunk_size=chunk)
    ch, cw = torch.autograd.grad(got * 1.7, (h, w))
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ch, gh, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cw, gw, rtol=1e-12, atol=1e-12)
    assert torch.all(ch[[2, 5, 6]] == 0)


@pytest.mark.parametrize("scale", [1.0, 1e3])
def test_float32_extreme_logits_match_float64(scale):
    """Logit gaps of thousands (a confident, or diverging, model): every exp would overflow or underflow without
    the max shift; the loss and gradient must still match a float64 reference, with no inf/nan."""
    h, w, t = data(ignore=(4,))
    h = (h.detach() * scale).requires_grad_()
    ref = F.cross_entropy(h @ w.t(), t)
    gh = torch.autograd.grad(ref, h)[0]
    h32, w32 = h.detach().float().requires_grad_(), w.detach().float()
    got = chunked_cross_entropy(h32, w32, t, chunk_size=5)
    g32 = torch.autograd.grad(got, h32)[0]
    assert torch.isfinite(got) and torch.isfinite(g32).all()
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-4 * scale)
    torch.testing.assert_close(g32.double(), gh, rtol=1e-4, atol=1e-5)


def test_custom_ignore_index_and_frozen_head():
    h, w, t = data(ignore=())
    t[:4] = 7
    w = w.detach()  # a frozen head (LoRA): no grad_weight is formed
    ref = F.cross_entropy(h @ w.t(), t, ignore_index=7)
    got = chunked_cross_entropy(h, w, t, chunk_size=6, ignore_index=7)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(torch.autograd.grad(got, h)[0], torch.autograd.grad(ref, h)[0])


def test_gradcheck():
    h, w, t = data(N=7, d=3, V=5, ignore=(1,))
    assert torch.autograd.gradcheck(lambda h, w: chunked_cross_entropy(h, w, t, chunk_size=3), (h, w))


def test_no_grad_and_bf16_autocast():
    h, w, t = data(N=40, d=16, V=50, ignore=())
    h32, w32 = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    with torch.no_grad():
        torch.testing.assert_close(chunked_cross_entropy(h32, w32, t, 7), F.cross_entropy(h32 @ w32.t(), t))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = chunked_cross_entropy(h32, w32, t, chunk_size=16)
    assert got.dtype == torch.float32
    got.backward()
    assert h32.grad.dtype == torch.float32 and w32.grad.dtype == torch.float32
    torch.testing.assert_close(got, F.cross_entropy(h32 @ w32.t(), t), rtol=0.02, atol=0.02)


@pytest.mark.parametrize("tie", [True, False])
def test_gpt_loss_equals_full_logits_loss(tie):
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(
            vocab_size=97, n_layer=2, n_head=4, d_model=32, d_ff=64, max_position_embeddings=16, tie_embeddings=tie
        )
    ).double()
    x, y = torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16))
    y[0, :3] = -100
    ref = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    got = model.loss(x, y, chunk_size=5)
    torch.testing.assert_close(got, ref)
    for a, b in zip(torch.autograd.grad(got, list(model.parameters())), ref_grads):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="targets shape"):
        model.loss(x, y[:, :5])
