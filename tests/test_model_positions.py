"""Position tables against their papers' formulas."""

import math

import torch

from model.positions import alibi_bias, alibi_slopes, apply_rope, rope_tables, sinusoidal_table


def rotate(x: torch.Tensor, pos: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (D,) at absolute position pos, through apply_rope's (B, T, H, D) layout."""
    return apply_rope(x.view(1, 1, 1, -1), cos[pos].view(1, 1, -1), sin[pos].view(1, 1, -1)).view(-1)


def test_rope_dot_product_depends_only_on_the_offset():
    torch.manual_seed(0)
    cos, sin = (t.double() for t in rope_tables(600, 16, 10000.0))
    for _ in range(5):
        q, k = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
        for m, n in [(3, 0), (10, 10), (7, 12)]:
            ref = rotate(q, m, cos, sin) @ rotate(k, n, cos, sin)
            for shift in (1, 37, 500):
                got = rotate(q, m + shift, cos, sin) @ rotate(k, n + shift, cos, sin)
                torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(
            rotate(q, 5, cos, sin) @ rotate(k, 0, cos, sin), rotate(q, 6, cos, sin) @ rotate(k, 0, cos, sin)
        )


def test_rope_rotates_pairs_half_apart_and_keeps_norms():
    cos, sin = rope_tables(8, 4, 10000.0)
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    # frequency 0 acts on dims (0, 2) with angle p, frequency 1 on dims (1, 3) with angle p / 100
    got = rotate(x, 3, cos, sin)
    a, b = 3.0, 3.0 / 100.0
    want = torch.tensor(
        [
            1 * math.cos(a) - 3 * math.sin(a),
            2 * math.cos(b) - 4 * math.sin(b),
            3 * math.cos(a) + 1 * math.sin(a),
            4 * math.cos(b) + 2 * math.sin(b),
        ]
    )
    torch.testing.assert_close(got, want)


def test_partial_rotary_passes_the_rest_through():
    cos, sin = rope_tables(10, 4, 10000.0)  # rotate 4 of 8 dims
    x = torch.randn(2, 10, 3, 8)
    y = apply_rope(x, cos[:, None], sin[:, None])
    torch.testing.assert_close(y[..., 4:], x[..., 4:])
    torch.testing.assert_close(y[..., :4].norm(dim=-1), x[..., :4].norm(dim=-1))


def test_alibi_slopes_follow_the_paper():
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    # 12 heads: the 8-head slopes, then the odd-numbered slopes of the 16-head sequence 2^(-0.5 (i+1))
    want = [2.0 ** -(i + 1) for i in range(8)] + [2.0**-0.5, 2.0**-1.5, 2.0**-2.5, 2.0**-3.5]
    torch.testing.assert_close(alibi_slopes(12), torch.tensor(want))


def test_alibi_bias_is_relative_and_causal():
    bias = alibi_bias(alibi_slopes(4), 5)  # (H, 5, 5)
    assert bias.shape == (4, 5, 5)
    assert torch.isinf(bias[:, 0, 1:]).all() and torch.all(bias.diagonal(dim1=1, dim2=2) == 0)
    torch.testing.assert_close(bias[1, 4, 1], torch.tensor(-3 * 2.0**-4))


def test_sinusoidal_values():
    d = 16
    table = sinusoidal_table(128, d)
    for p in (0, 1, 7, 100):
        for i in (0, 3, 7):
            angle = p / 10000 ** (2 * i / d)
            assert math.isclose(table[p, 2 * i].item(), math.sin(angle), abs_tol=1e-6)
            assert math.isclose(table[p, 2 * i + 1].item(), math.cos(angle), abs_tol=1e-6)
