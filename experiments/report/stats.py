"""Statistics over seeds, done by scipy: mean ± t-interval, and the difference of two values of a study.

Runs of two values at the same seed share the data order and the LoRA initialisation, so their difference is
paired: the paired t-test works on the per-seed differences and removes the seed-to-seed spread both values share.
Where the seeds do not pair (a value missing a seed) the comparison falls back to Welch's unequal-variance test,
and says so in `Difference.test`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from scipy import stats

PAIRED = "paired"
WELCH = "Welch"


@dataclass
class Summary:
    """Mean of n samples with the half-width of its two-sided CI (None with fewer than two samples)."""

    n: int
    mean: float
    sd: float | None
    half: float | None


def mean_ci(xs: Sequence[float], level: float = 0.95) -> Summary:
    """mean ± t(1 - (1-level)/2, n-1) * sd / sqrt(n), the usual t-interval for a mean over seeds."""
    n = len(xs)
    if n == 0:
        raise ValueError("mean_ci needs at least one value")
    mean = statistics.fmean(xs)
    if n < 2:
        return Summary(n, mean, None, None)
    sd = statistics.stdev(xs)
    return Summary(n, mean, sd, float(stats.t.ppf(0.5 + level / 2.0, n - 1)) * sd / math.sqrt(n))


@dataclass
class Difference:
    """mean(a) - mean(b) with its CI half-width and two-sided p-value; `significant` iff the CI excludes zero.

    `test` is "paired" (per-seed differences), "Welch" (unpaired fallback) or None (one seed: not testable)."""

    diff: float
    half: float | None
    df: float | None
    p: float | None
    significant: bool | None
    test: str | None
    n: int  # seeds in the paired test; the smaller side for Welch


def _no_spread(diff: float, test: str, n: int) -> Difference:
    """Every seed says the same thing: the CI has zero width, and any non-zero difference is beyond noise."""
    return Difference(diff, 0.0, None, 0.0 if diff else 1.0, diff != 0.0, test, n)


def _is_constant(xs: Sequence[float]) -> bool:
    return max(xs) - min(xs) <= 1e-12 * max(1.0, max(abs(x) for x in xs))


def paired(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Difference:
    """Paired t-test of a - b, element i of a with element i of b (same seed): mean of the differences
    ± t(1 - (1-level)/2, n-1) * sd(differences) / sqrt(n)."""
    if len(a) != len(b):
        raise ValueError(f"paired test needs as many values on each side, got {len(a)} and {len(b)}")
    n = len(a)
    diffs = [x - y for x, y in zip(a, b)]
    diff = statistics.fmean(diffs)
    if n < 2:
        return Difference(diff, None, None, None, None, None, n)
    if _is_constant(diffs):
        return _no_spread(diff, PAIRED, n)
    res = stats.ttest_rel(a, b)
    ci = res.confidence_interval(level)
    half = float(ci.high - ci.low) / 2.0
    return Difference(diff, half, float(res.df), float(res.pvalue), abs(diff) > half, PAIRED, n)


def welch(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Difference:
    """Welch's unequal-variance t-test of mean(a) - mean(b) (df by Welch-Satterthwaite, as scipy computes it)."""
    diff = statistics.fmean(a) - statistics.fmean(b)
    n = min(len(a), len(b))
    if n < 2:
        return Difference(diff, None, None, None, None, None, n)
    if _is_constant(a) and _is_constant(b):
        return _no_spread(diff, WELCH, n)
    res = stats.ttest_ind(a, b, equal_var=False)
    ci = res.confidence_interval(level)
    half = float(ci.high - ci.low) / 2.0
    return Difference(diff, half, float(res.df), float(res.pvalue), abs(diff) > half, WELCH, n)


def compare(a: Mapping[int, float], b: Mapping[int, float], level: float = 0.95) -> Difference:
    """a - b where a and b map seed -> measurement: paired when both sides have the same seeds, else Welch."""
    if not a or not b:
        raise ValueError("compare needs at least one seed on each side")
    if a.keys() == b.keys():
        seeds = sorted(a)
        return paired([a[s] for s in seeds], [b[s] for s in seeds], level)
    return welch(list(a.values()), list(b.values()), level)


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None when either side is constant or n < 2."""
    if len(xs) != len(ys) or len(xs) < 2 or _is_constant(xs) or _is_constant(ys):
        return None
    return float(stats.spearmanr(xs, ys).statistic)
