"""A finding tested against measured numbers: what was expected, what was observed, and one verdict from a fixed
set. The report's expected-vs-observed section (experiments.report.expectations) and the benchmark targets
(bench.targets) both judge with it, so a verdict reads the same everywhere and is never parsed back from text."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Verdict(Enum):
    """How a check came out; the value is the word a reader sees."""

    HELD = "held"  # the expected direction (or bound), beyond noise where there are seeds to tell
    PARTLY_HELD = "partly held"  # the readings the check gives disagree
    WITHIN_NOISE = "within noise"  # the expected direction, not significant
    NOT_HELD = "did not hold"  # the opposite direction, or the bound missed
    NOT_HELD_WITHIN_NOISE = "did not hold (within noise)"  # the opposite direction, not significant
    NOT_TESTABLE = "not testable"  # the numbers it needs are not there

    def __str__(self) -> str:
        return self.value


@dataclass
class Check:
    """One expected finding, what was measured, and the verdict. `one_seed`: a verdict read from one seed per
    value, which gives the direction but no test against noise (shown as "(1 seed)")."""

    expected: str
    observed: str
    verdict: Verdict
    caveat: str | None = None  # what a reader of the study's recommended value must also know
    one_seed: bool = False

    @property
    def text(self) -> str:
        """The verdict as a reader sees it: "held", "held (1 seed)", "did not hold (within noise)"."""
        return self.verdict.value + (" (1 seed)" if self.one_seed else "")
