"""How numbers read in the report and the terminal: one format per kind of figure, and markdown tables."""

from __future__ import annotations

import math

from experiments.report.stats import Difference, Summary


def num(x: float | None, digits: int = 3) -> str:
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def ci(s: Summary | None, digits: int = 3) -> str:
    if s is None:
        return "—"
    return f"{s.mean:.{digits}f} ± {s.half:.{digits}f}" if s.half is not None else f"{s.mean:.{digits}f}"


def mib(x: float | None) -> str:
    return "—" if x is None else f"{x / 2**20:,.1f} MiB"


def integer(x: float | None) -> str:
    return "—" if x is None else f"{round(x):,}"


def diff_text(d: Difference, base: float, digits: int = 3) -> str:
    """ "+3.302 ± 0.660 (+1.40%), significant, paired": the difference, its CI, relative size, verdict and test."""
    rel = f" ({d.diff / base:+.2%})" if base else ""
    if d.significant is None:
        return f"{d.diff:+.{digits}f}{rel}, 1 seed"
    verdict = "significant" if d.significant else "within noise"
    return f"{d.diff:+.{digits}f} ± {d.half:.{digits}f}{rel}, {verdict}, {d.test}"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)
