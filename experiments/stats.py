"""Small-sample statistics for seeds: Student-t quantiles, mean ± CI, and Welch's test against a baseline.

Written out here (no scipy): the t CDF is the regularized incomplete beta function, evaluated by its continued
fraction, and the quantile is found by bisection on the CDF. Degrees of freedom may be fractional, as Welch's
test needs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def _beta_cf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz), valid for x < (a+1)/(a+b+2)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),  # even step
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):  # odd step
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_cf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_cf(b, a, 1.0 - x) / b  # symmetry converges faster here


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p: e.g. t_quantile(0.975, 4) = 2.776 (the 95% two-sided critical value)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    for _ in range(200):  # bisection: the CDF is monotone, 200 halvings reach float precision
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


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
    mean = sum(xs) / n
    if n < 2:
        return Summary(n, mean, None, None)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    return Summary(n, mean, sd, t_quantile(0.5 + level / 2.0, n - 1) * sd / math.sqrt(n))


@dataclass
class Difference:
    """mean(a) - mean(b) with Welch's CI and two-sided p-value; `significant` iff the CI excludes zero."""

    diff: float
    half: float | None
    df: float | None
    p: float | None
    significant: bool | None  # None: not testable (fewer than two samples on a side)


def welch(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Difference:
    """Welch's unequal-variance t-test of mean(a) - mean(b).

    se = sqrt(s_a^2/n_a + s_b^2/n_b); df by Welch-Satterthwaite; CI = diff ± t(1 - (1-level)/2, df) * se.
    The CI excluding zero is the same decision as p < 1 - level.
    """
    sa, sb = mean_ci(a, level), mean_ci(b, level)
    diff = sa.mean - sb.mean
    if sa.sd is None or sb.sd is None:
        return Difference(diff, None, None, None, None)
    va, vb = sa.sd**2 / sa.n, sb.sd**2 / sb.n
    se = math.sqrt(va + vb)
    if se == 0.0:  # identical samples on both sides: no spread to test against
        return Difference(diff, 0.0, None, 0.0 if diff else 1.0, diff != 0.0)
    df = (va + vb) ** 2 / (va**2 / (sa.n - 1) + vb**2 / (sb.n - 1))
    t = diff / se
    p = 2.0 * (1.0 - t_cdf(abs(t), df))
    half = t_quantile(0.5 + level / 2.0, df) * se
    return Difference(diff, half, df, p, abs(diff) > half)


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None when either side is constant or n < 2."""
    if len(xs) != len(ys) or len(xs) < 2:
        return None

    def ranks(v: Sequence[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2.0
            i = j + 1
        return r

    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)
