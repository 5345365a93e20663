"""The statistics behind "mean ± 95% CI" and "significant": checked against printed t-table values."""

from __future__ import annotations

import math
import random

import pytest

from experiments.stats import betainc, mean_ci, spearman, t_cdf, t_quantile, welch

# Two-sided 95% critical values t(0.975, df) from a standard t-table (3 decimals).
T_TABLE_975 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    9: 2.262,
    10: 2.228,
    20: 2.086,
    30: 2.042,
    60: 2.000,
    120: 1.980,
}


@pytest.mark.parametrize("df,expected", sorted(T_TABLE_975.items()))
def test_t_quantile_matches_t_table(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=5e-4)


def test_t_quantile_other_levels_symmetry_and_normal_limit():
    assert t_quantile(0.95, 5) == pytest.approx(2.015, abs=5e-4)
    assert t_quantile(0.995, 3) == pytest.approx(5.841, abs=5e-4)
    assert t_quantile(0.90, 1) == pytest.approx(3.078, abs=5e-4)
    assert t_quantile(0.025, 4) == pytest.approx(-t_quantile(0.975, 4))
    assert t_quantile(0.975, 1e7) == pytest.approx(1.95996, abs=1e-4)  # -> the normal quantile
    assert t_quantile(0.5, 3) == pytest.approx(0.0, abs=1e-9)
    # Fractional df (Welch) lies between its integer neighbours.
    assert t_quantile(0.975, 4) > t_quantile(0.975, 4.5) > t_quantile(0.975, 5)


def test_t_cdf_closed_forms():
    # df = 1 is Cauchy: F(t) = 1/2 + atan(t)/pi; df = 2: F(t) = 1/2 + t / (2 sqrt(2 + t^2)).
    for t in (-3.0, -0.4, 0.0, 0.7, 5.0):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
    assert betainc(2.0, 3.0, 0.4) == pytest.approx(0.5248, abs=1e-12)  # I_x(2,3) = 6x^2 - 8x^3 + 3x^4
    with pytest.raises(ValueError):
        t_quantile(1.0, 3)


def test_mean_ci():
    s = mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    assert s.mean == 3.0 and s.sd == pytest.approx(math.sqrt(2.5))
    assert s.half == pytest.approx(2.776445 * math.sqrt(2.5) / math.sqrt(5), rel=1e-6)
    one = mean_ci([4.2])
    assert one.n == 1 and one.half is None and one.sd is None


def test_welch_against_hand_computation():
    a, b = [1.0, 2.0, 3.0, 4.0], [2.0, 3.0, 4.0, 5.0, 6.5]
    d = welch(a, b)
    va, vb = (5 / 3) / 4, 3.05 / 5
    df = (va + vb) ** 2 / (va**2 / 3 + vb**2 / 4)
    assert d.diff == pytest.approx(2.5 - 4.1)
    assert d.df == pytest.approx(df)
    assert d.half == pytest.approx(t_quantile(0.975, df) * math.sqrt(va + vb))
    assert d.p == pytest.approx(2 * (1 - t_cdf(abs(d.diff) / math.sqrt(va + vb), df)))
    assert d.significant is False and d.p > 0.05
    far = welch([10.0, 10.1, 9.9], [12.0, 12.2, 11.9])
    assert far.significant is True and far.p < 0.01
    assert welch([1.0], [2.0, 3.0]).significant is None  # one seed: not testable


def test_welch_false_positive_rate_is_about_five_percent():
    """Same distribution on both sides: the 95% test should call ~5% of pairs significant."""
    rng = random.Random(0)
    hits = sum(
        welch([rng.gauss(0, 1) for _ in range(3)], [rng.gauss(0, 2) for _ in range(4)]).significant for _ in range(2000)
    )
    assert 0.03 < hits / 2000 < 0.07


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 3, 1]) == pytest.approx(-0.9486833)
    assert spearman([1, 2], [5, 5]) is None
