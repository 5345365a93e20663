"""The statistics behind "mean ± 95% CI", "significant" and "paired / Welch": checked against hand computations
with printed t-table values, and against the property that matters (the paired test sees through a seed shift)."""

from __future__ import annotations

import math
import random

import pytest
from scipy import stats
from scipy.stats import t as student_t

from experiments.report.stats import PAIRED, WELCH, _is_constant, compare, mean_ci, paired, spearman, welch

T975 = {2: 4.302653, 4: 2.776445}  # two-sided 95% critical values t(0.975, df), standard t-table


def test_mean_ci_against_t_table():
    s = mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    assert s.mean == 3.0 and s.sd == pytest.approx(math.sqrt(2.5))
    assert s.half == pytest.approx(T975[4] * math.sqrt(2.5) / math.sqrt(5), rel=1e-6)
    one = mean_ci([4.2])
    assert one.n == 1 and one.half is None and one.sd is None
    with pytest.raises(ValueError, match="at least one"):
        mean_ci([])


def test_paired_interval_by_hand():
    # Per-seed differences 1.0, 1.5, 1.5: mean 4/3, sd sqrt(1/12), se = sd/sqrt(3) = 1/6, t = 8 on 2 df.
    a, b = [10.0, 12.0, 11.5], [9.0, 10.5, 10.0]
    d = paired(a, b)
    assert d.test == PAIRED and d.n == 3 and d.df == 2
    assert d.diff == pytest.approx(4 / 3)
    assert d.half == pytest.approx(T975[2] / 6, rel=1e-6)
    # df = 2 has a closed-form CDF: F(t) = 1/2 + t / (2 sqrt(2 + t^2)); two-sided p = 2 (1 - F(8)).
    assert d.p == pytest.approx(2 * (0.5 - 8 / (2 * math.sqrt(66))), rel=1e-9)
    assert d.significant is True


def test_pairing_sees_through_a_shared_seed_shift():
    # Seeds move both values by up to ±10; b is 1 lower at every seed. Welch sees the spread, the paired test
    # sees the constant-ish difference.
    shift = [-10.0, 0.0, 10.0]
    a = [100.0 + s + e for s, e in zip(shift, (0.1, -0.1, 0.0))]
    b = [99.0 + s for s in shift]
    assert paired(a, b).significant is True
    assert welch(a, b).significant is False
    assert compare(dict(enumerate(a)), dict(enumerate(b))).test == PAIRED


def test_a_missing_seed_falls_back_to_welch_and_says_so():
    a = {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0}
    b = {0: 2.0, 1: 3.0, 2: 4.0, 3: 5.0, 4: 6.5}  # seed 4 has no partner in a
    d = compare(a, b)
    assert d.test == WELCH
    # Welch by hand: se^2 = s_a^2/n_a + s_b^2/n_b, df by Welch-Satterthwaite.
    va, vb = (5 / 3) / 4, 3.05 / 5
    df = (va + vb) ** 2 / (va**2 / 3 + vb**2 / 4)
    assert d.diff == pytest.approx(2.5 - 4.1)
    assert d.df == pytest.approx(df)
    assert d.half == pytest.approx(student_t.ppf(0.975, df) * math.sqrt(va + vb))
    assert d.significant is False and d.p > 0.05


def test_one_seed_is_not_testable_and_no_spread_is_exact():
    one = compare({0: 1.0}, {0: 2.0})
    assert one.significant is None and one.test is None and one.half is None and one.diff == -1.0
    assert compare({0: 1.0}, {0: 2.0, 1: 3.0}).significant is None
    same = paired([3.0, 4.0, 5.0], [1.0, 2.0, 3.0])  # every seed differs by exactly 2
    assert same.half == 0.0 and same.significant is True and same.p == 0.0
    assert paired([1.0, 2.0], [1.0, 2.0]).significant is False
    with pytest.raises(ValueError, match="as many values"):
        paired([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="at least one seed"):
        compare({}, {0: 1.0})


def test_paired_false_positive_rate_is_about_five_percent():
    """Same distribution for both values, a large seed shift shared by both: ~5% of pairs called significant."""
    rng = random.Random(0)
    hits = 0
    for _ in range(2000):
        shift = [rng.gauss(0, 5) for _ in range(3)]
        hits += paired([s + rng.gauss(0, 1) for s in shift], [s + rng.gauss(0, 1) for s in shift]).significant
    assert 0.03 < hits / 2000 < 0.07


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 3, 1]) == pytest.approx(-0.9486833)
    assert spearman([1, 2], [5, 5]) is None
    assert spearman([1], [2]) is None
    assert spearman([1, 2], [2, 1]) == pytest.approx(-1.0)  # two points are enough for a rank order
    assert spearman([1, 2, 3], [1, 2]) is None  # unequal lengths: no pairs


def test_spearman_is_none_when_either_side_alone_is_constant():
    """Each side's constancy is enough on its own (scipy would give nan): kills `len(xs) < 2 or _is_constant(xs)`
    mutated to `and`, which lets a constant xs through."""
    assert spearman([5, 5], [1, 2]) is None
    assert spearman([5.0, 5.0, 5.0], [1.0, 3.0, 2.0]) is None
    assert spearman([1, 2], [5, 5]) is None


def test_welch_edge_cases_are_exact():
    one = welch([1.0], [2.0, 4.0])  # one seed on a side: the difference, but no test
    assert (one.diff, one.half, one.df, one.p, one.significant, one.test, one.n) == (
        -2.0,
        None,
        None,
        None,
        None,
        None,
        1,
    )
    flat = welch([1.0, 1.0, 1.0], [3.0, 3.0])  # no spread on either side: exact, zero-width interval
    assert (flat.diff, flat.half, flat.p, flat.significant, flat.test, flat.n) == (-2.0, 0.0, 0.0, True, WELCH, 2)
    tie = welch([2.0, 2.0], [2.0, 2.0])
    assert (tie.half, tie.p, tie.significant) == (0.0, 1.0, False)
    one_flat = welch([1.0, 1.0, 1.0], [2.0, 3.0, 4.0])  # one side flat: still a real Welch test, df = n_b - 1
    assert one_flat.test == WELCH and one_flat.n == 3 and one_flat.df == pytest.approx(2.0)
    assert one_flat.half == pytest.approx(student_t.ppf(0.975, 2) * math.sqrt(1.0 / 3)) and one_flat.half > 0
    scipy_ci = stats.ttest_ind([1.0, 1.0, 1.0], [2.0, 3.0, 4.0], equal_var=False).confidence_interval(0.95)
    assert scipy_ci.low < 0 < scipy_ci.high  # scipy's own interval holds zero: -2 ± 2.48 is within noise
    assert one_flat.significant is False


def test_paired_edge_cases_are_exact():
    one = paired([1.5], [1.0])  # one seed: the difference, no test, and still the seed count
    assert (one.diff, one.half, one.significant, one.test, one.n) == (0.5, None, None, None, 1)
    flat = paired([3.0, 4.0, 5.0], [1.0, 2.0, 3.0])  # every seed says +2: zero-width interval, beyond noise
    assert (flat.diff, flat.half, flat.p, flat.significant, flat.test, flat.n) == (2.0, 0.0, 0.0, True, PAIRED, 3)
    assert mean_ci([1.0, 2.0, 4.0]).n == 3 and mean_ci([7.0]).n == 1


def test_compare_passes_the_level_on_to_both_tests():
    a, b = {0: 1.0, 1: 2.5, 2: 2.0}, {0: 0.0, 1: 1.0, 2: 1.5}
    for other in (b, {3: 0.0, 4: 1.0, 5: 1.5}):  # paired (same seeds), Welch (none shared)
        wide, narrow = compare(a, other), compare(a, other, level=0.5)
        assert narrow.half < wide.half
    assert compare(a, b, level=0.5).half == pytest.approx(paired(list(a.values()), list(b.values()), 0.5).half)


def test_empty_inputs_are_refused_by_name():
    with pytest.raises(ValueError, match="^mean_ci needs at least one value$"):
        mean_ci([])
    with pytest.raises(ValueError, match="^compare needs at least one seed on each side$"):
        compare({}, {0: 1.0})


def test_constant_means_equal_up_to_float_rounding_of_the_values_size():
    assert _is_constant([1000.0, 1000.0 + 1e-10])  # relative: 1e-13 of the values
    assert not _is_constant([0.0, 1.5e-12])  # absolute below 1: 1.5e-12 is a real spread
    assert not _is_constant([1000.0, 1000.001])


def test_a_spread_exactly_at_the_tolerance_counts_as_constant():
    """1e-12 below 1 is the absolute tolerance itself, and the bound is inclusive (kills `<=` mutated to `<`)."""
    assert _is_constant([0.0, 1e-12])
    assert not _is_constant([0.0, 2e-12])
