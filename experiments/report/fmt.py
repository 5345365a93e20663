"""How numbers read in the report, the terminal and the benchmarks: one format per kind of figure, one mark for an
empty cell, and the one markdown table builder."""

from __future__ import annotations

import math
from collections.abc import Sequence

from experiments.report.stats import Difference, Summary

EMPTY = "—"  # an empty cell or figure, in every table
MIB = 2**20  # bytes per MiB: every memory figure shown is in MiB


def num(x: float | None, digits: int = 3) -> str:
    return EMPTY if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def ci(s: Summary | None, digits: int = 3) -> str:
    if s is None:
        return EMPTY
    return f"{s.mean:.{digits}f} ± {s.half:.{digits}f}" if s.half is not None else f"{s.mean:.{digits}f}"


def mib(x: float | None) -> str:
    return EMPTY if x is None else f"{x / MIB:,.1f} MiB"


def integer(x: float | None) -> str:
    return EMPTY if x is None else f"{round(x):,}"


def diff_text(d: Difference, base: float | None = None, digits: int = 3, unit: str = "", verdict: bool = True) -> str:
    """ "+3.302 ± 0.660 (+1.40%), significant, paired": the difference (with `unit`), its CI, its size relative to
    `base` (when given), the verdict on noise (when `verdict`) and the test; "+3.302 (+1.40%), 1 seed" without one."""
    rel = f" ({d.diff / base:+.2%})" if base else ""
    if d.significant is None:
        return f"{d.diff:+.{digits}f}{unit}{rel}, 1 seed"
    words = ("significant" if d.significant else "within noise",) if verdict else ()
    return ", ".join((f"{d.diff:+.{digits}f} ± {d.half:.{digits}f}{unit}{rel}", *words, str(d.test)))


def md_table(header: Sequence[str], rows: Sequence[Sequence[str | None]]) -> str:
    """A markdown table; a None cell shows EMPTY, and a | inside a cell is escaped."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(EMPTY if c is None else c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)
