"""The chunked cross-entropy against F.cross_entropy in float64, and gradcheck."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import model.loss as loss_module
from model.loss import chunked_cross_entropy


def data(N=23, d=8, V=13, ignore=(2, 5, 6), device="cpu"):
    """Random float64 hidden (N, d) and head (V, d) that require grad, targets (N,) with `ignore` rows at -100."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, d, dtype=torch.float64, generator=g).to(device).requires_grad_()
    w = torch.randn(V, d, dtype=torch.float64, generator=g).to(device).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    t[list(ignore)] = -100
    return h, w, t.to(device)


@pytest.mark.parametrize("chunk", [1, 5, 23, 64, None])
def test_matches_cross_entropy_value_and_grads(chunk, device):
    h, w, t = data(device=device)
    ref = F.cross_entropy(h @ w.t(), t, ignore_index=-100)
    gh, gw = torch.autograd.grad(ref * 1.7, (h, w))
    got = chunked_cross_entropy(h, w, t, chunk_size=chunk)
    ch, cw = torch.autograd.grad(got * 1.7, (h, w))
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ch, gh, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cw, gw, rtol=1e-12, atol=1e-12)
    assert torch.all(ch[[2, 5, 6]] == 0)


# float32 loss and gradient against float64 on the float64 inputs (the error is mostly h and w rounded to float32),
# measured on CPU (Xeon, AMX) over 50 seeds: loss relative error <= 1.6e-7 (seed 0, tested here: 6.5e-9 at scale 1,
# 8.4e-9 at 1e3); gradient max abs error <= 5.7e-8 at scale 1 and 5.8e-6 at 1e3 (seed 0: 2.9e-8, 1.5e-8; gradients
# of size ~0.2). The bounds are ~3x the 50-seed worst: a missing max shift (inf/nan) or a wrong term cannot pass.
LOSS_RTOL = 5e-7
GRAD_ATOL = {1.0: 2e-7, 1e3: 2e-5}


@pytest.mark.parametrize("scale", [1.0, 1e3])
def test_float32_extreme_logits_match_float64(scale, device):
    """Logit gaps of thousands (a confident, or diverging, model): every exp would overflow or underflow without
    the max shift; the loss and gradient must still match a float64 reference, with no inf/nan."""
    h, w, t = data(ignore=(4,), device=device)
    h = (h.detach() * scale).requires_grad_()
    ref = F.cross_entropy(h @ w.t(), t)
    gh = torch.autograd.grad(ref, h)[0]
    h32, w32 = h.detach().float().requires_grad_(), w.detach().float()
    got = chunked_cross_entropy(h32, w32, t, chunk_size=5)
    g32 = torch.autograd.grad(got, h32)[0]
    assert torch.isfinite(got) and torch.isfinite(g32).all()
    torch.testing.assert_close(got.double(), ref, rtol=LOSS_RTOL, atol=0)
    torch.testing.assert_close(g32.double(), gh, rtol=0, atol=GRAD_ATOL[scale])


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


def test_no_grad_matches_cross_entropy(device):
    """Without a gradient the loss takes the logsumexp path: the same value as F.cross_entropy, in float64."""
    h, w, t = data(device=device)
    with torch.no_grad():
        got = chunked_cross_entropy(h, w, t, chunk_size=7)
    torch.testing.assert_close(got, F.cross_entropy(h @ w.t(), t), rtol=1e-12, atol=1e-12)
    assert not got.requires_grad


def test_bf16_autocast_within_bf16_rounding(device):
    """Under bf16 autocast the head GEMMs run in bf16 and the softmax in float32. Reference: float64 on the
    bf16-rounded inputs. Tolerance, from what bf16 can achieve (unit roundoff u = 2^-8), to first order: logits z are
    rounded once (|dz| <= u|z|), so each token's loss moves by <= 2u max|z|; the softmax then moves by
    <= p * 2u max|z|, p - onehot and each GEMM output are rounded once more (u each); the gradients' bounds below
    push those through the head. Measured on CPU over 50 seeds: at most 0.064 (loss) and 0.47 (gradients, per
    element) of these bounds; ignored tokens must get exactly zero gradient."""
    h, w, t = data(N=40, d=16, V=50, ignore=(3, 7), device=device)
    h32, w32 = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        got = chunked_cross_entropy(h32, w32, t, chunk_size=16)
    got.backward()
    assert got.dtype == h32.grad.dtype == w32.grad.dtype == torch.float32

    H, W = h.detach().bfloat16().double(), w.detach().bfloat16().double()
    z = H @ W.t()  # (N, V)
    valid = (t != -100)[:, None]
    n, u, zmax = valid.sum(), 2.0**-8, z.abs().max()
    p, onehot = z.softmax(-1), F.one_hot(t.clamp(min=0), 50).double()
    dz = (p - onehot) * valid / n  # d loss / d logits
    err_dz = (p * 2 * u * zmax + u * (p - onehot).abs()) * valid / n
    grad_h, grad_w = dz @ W, dz.t() @ H
    bound_loss = 2 * u * (z.abs() * valid).amax(-1).sum() / n
    bound_h = err_dz @ W.abs() + u * grad_h.abs()
    bound_w = err_dz.t() @ H.abs() + 2 * u * grad_w.abs()  # a chunk's bf16 GEMM output, then the float32 sum
    assert (got.double() - F.cross_entropy(z, t)).abs() <= bound_loss
    assert ((h32.grad.double() - grad_h).abs() <= bound_h).all()
    assert ((w32.grad.double() - grad_w).abs() <= bound_w).all()


@pytest.mark.parametrize("tie", [True, False])
def test_gpt_loss_equals_full_logits_loss(tie, tiny_gpt, device):
    model = tiny_gpt(tie_embeddings=tie).to(device, torch.float64)
    x, y = torch.randint(0, 97, (2, 16), device=device), torch.randint(0, 97, (2, 16), device=device)
    y[0, :3] = -100
    ref = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    got = model.loss(x, y, chunk_size=5)
    torch.testing.assert_close(got, ref)
    for a, b in zip(torch.autograd.grad(got, list(model.parameters())), ref_grads):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="targets shape"):
        model.loss(x, y[:, :5])


def test_bad_shapes_and_chunk_size_are_refused():
    h, w, t = data()
    for args, message in (
        (
            (h[None], w, t),
            r"expected hidden \(N, d\), weight \(V, d\), targets \(N,\); got \(1, 23, 8\), \(13, 8\), \(23,\)",
        ),
        ((h, w, t[:, None]), r"expected hidden .*; got \(23, 8\), \(13, 8\), \(23, 1\)"),
        ((h, w[:, :5], t), r"shape mismatch: hidden \(23, 8\), weight \(13, 5\), targets \(23,\)"),
        ((h, w, t[:7]), r"shape mismatch: hidden \(23, 8\), weight \(13, 8\), targets \(7,\)"),
    ):
        with pytest.raises(ValueError, match=message):
            chunked_cross_entropy(*args)
    with pytest.raises(ValueError, match="chunk_size must be positive, got 0"):
        chunked_cross_entropy(h, w, t, chunk_size=0)


def test_gpt_loss_passes_chunk_size_and_ignore_index_on(tiny_gpt):
    model = tiny_gpt().double()
    x, y = torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16))
    y[0, :3] = -1
    ref = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-1)
    torch.testing.assert_close(model.loss(x, y, ignore_index=-1), ref)
    with pytest.raises(ValueError, match="chunk_size must be positive, got 0"):
        model.loss(x, y, chunk_size=0)


class _CountOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts matrix products (and notes their input dtypes) and the (V, d) buffers created while active."""

    def __init__(self, head_shape):
        super().__init__()
        self.head_shape, self.mm, self.head_buffers, self.buffers, self.mm_dtypes = tuple(head_shape), 0, 0, 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm", "addmm_"):
            self.mm += 1
            self.mm_dtypes |= {a.dtype for a in args if isinstance(a, torch.Tensor)}
        buffer = name in ("zeros", "empty", "zeros_like", "empty_like")
        self.head_buffers += buffer and tuple(out.shape) == self.head_shape
        self.buffers += buffer and out.dim() == 2
        return out


@pytest.mark.parametrize("grad", ["none", "hidden", "both"])
def test_the_loss_does_only_the_gradient_work_asked_for(grad):
    """Evaluation (no grad) does one head GEMM per chunk; with a frozen head (LoRA) no (V, d) gradient buffer."""
    h, w, t = data(N=20)
    chunks = 4  # chunk_size 5
    with torch.set_grad_enabled(grad != "none"):
        w.requires_grad_(grad == "both")
        with _CountOps(w.shape) as ops:
            chunked_cross_entropy(h, w, t, chunk_size=5)
    want_mm = {"none": chunks, "hidden": 2 * chunks, "both": 3 * chunks}[grad]
    want_buffers = {"none": 0, "hidden": 1, "both": 2}[grad]  # grad_hidden (N, d), grad_weight (V, d)
    assert (ops.mm, ops.head_buffers, ops.buffers) == (want_mm, int(grad == "both"), want_buffers)


def test_default_chunks_hold_at_most_the_logits_budget(monkeypatch):
    monkeypatch.setattr(loss_module, "LOGITS_BUDGET", 13 * 100)  # V = 13: 100 tokens of logits per chunk
    h, w, t = data(N=400)
    with torch.no_grad(), _CountOps(w.shape) as ops:
        chunked_cross_entropy(h, w, t)
    assert ops.mm == 4


def test_default_chunks_on_cpu_hold_at_most_the_cpu_chunk_tokens(monkeypatch):
    monkeypatch.setattr(loss_module, "CPU_CHUNK_TOKENS", 150)  # fewer than the budget's 13e6 / 13 tokens
    monkeypatch.setattr(loss_module, "LOGITS_BUDGET", 13 * 10**6)
    h, w, t = data(N=400)
    with torch.no_grad(), _CountOps(w.shape) as ops:
        chunked_cross_entropy(h, w, t)
    assert ops.mm == 3  # 150 + 150 + 100 tokens


def test_head_gemms_run_in_the_autocast_dtype_and_inputs_are_promoted_without_it():
    h, w, t = data(N=40, d=16, V=50)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), _CountOps(w.shape) as ops:
        chunked_cross_entropy(h.float(), w.float(), t, chunk_size=16)
    assert ops.mm_dtypes == {torch.bfloat16}
    with torch.no_grad():
        mixed = chunked_cross_entropy(h.float(), w, t)  # float32 hidden, float64 head: computed in float64
        torch.testing.assert_close(mixed, chunked_cross_entropy(h.float().double(), w, t), rtol=0, atol=0)
    assert mixed.dtype == torch.float64


def test_the_loss_warns_about_nothing():
    """No deprecation or resize warning: each chunk's gradient is written into a view of exactly its size."""
    h, w, t = data()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        chunked_cross_entropy(h, w, t, chunk_size=5).backward()
