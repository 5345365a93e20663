"""Which value of a study to pick, and the trade-off it rests on: a recommended value per study and the Pareto
front of perplexity against a cost. The report, the terminal summary, the plots and the analysis notebook call it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from experiments.report.fmt import diff_text, num
from experiments.report.stats import Difference
from experiments.report.studies import Study, Value

METRIC = "val_ppl"
COSTS = ("trainable_params", "train_time_s", "peak_memory_bytes")  # what "cheapest" compares, in this order
COST_WORDS = {
    "trainable_params": "trainable parameters",
    "train_time_s": "train time",
    "peak_memory_bytes": "peak memory",
}
RULE = (
    "The recommended value is the cheapest one (fewest trainable parameters, then least train time, then least "
    "peak memory) whose validation perplexity is not significantly worse than the best value's (paired t-test "
    "over seeds, 95%); with one seed the noise is unknown, so the best value is recommended, provisionally."
)


@dataclass
class Recommendation:
    """The value to pick, the best value it was held against, and the evidence in one line."""

    value: Value
    best: Value
    diff: Difference | None  # value minus best on METRIC; None when the value is the best
    provisional: bool  # some comparison with the best had one seed: noise unknown
    evidence: str


def cost(v: Value) -> tuple[float, ...]:
    """The sort key of "cheapest": mean trainable params, train time, peak memory (missing: infinitely costly)."""
    means = (v.mean(m) for m in COSTS)
    return tuple(math.inf if m is None else m for m in means)


def _cheaper_by(v: Value, ref: Value) -> str:
    """ "4.0× fewer trainable parameters": the first cost on which v is cheaper than ref, as a ratio."""
    for m, a, b in zip(COSTS, cost(v), cost(ref)):
        if a < b and math.isfinite(b) and a > 0:
            return f"{b / a:.1f}× {'fewer' if m == 'trainable_params' else 'less'} {COST_WORDS[m]}"
    return "no cheaper"


def _diff(d: Difference) -> str:
    """ "+1.23 ± 0.45 ppl, paired": a difference in the evidence line (the verdict is the sentence's own)."""
    return diff_text(d, digits=2, unit=" ppl", verdict=False)


def _unknown_costs(st: Study, done: list[Value]) -> str:
    """Values ranked as most costly because their rows lack a cost other values have (a row of an older version,
    or edited by hand): said in the evidence, never silent."""
    parts = []
    for m, word in COST_WORDS.items():
        unknown = [v for v in done if v.mean(m) is None]
        if unknown and len(unknown) < len(done):
            parts.append(f"{word} unknown for {', '.join(st.named(v) for v in unknown)} (rows without `{m}`)")
    return "".join(f"; {p}, ranked as the most costly" for p in parts)


def recommend(st: Study) -> Recommendation | None:
    """RULE applied to a study; None when no value has a finished run."""
    done = [v for v in st.values if v.metric(METRIC)]
    if not done:
        return None
    best = min(done, key=lambda v: v.mean(METRIC))
    diffs = {id(v): v.vs(best, METRIC) for v in done if v is not best}
    provisional = any(d.significant is None for d in diffs.values())
    pick, rejected = best, []
    for v in sorted(done, key=cost):
        if v is best:
            break
        if diffs[id(v)].significant is False:
            pick = v
            break
        rejected.append(v)
    name = st.named(pick)
    if pick is not best:
        d = diffs[id(pick)]
        evidence = f"{name}: within noise of the best ({st.named(best)}: {_diff(d)}), {_cheaper_by(pick, best)}"
    elif rejected:
        nearest = rejected[-1]  # the cheaper value closest in cost to the best
        how = "significantly worse" if not provisional else "worse"
        evidence = (
            f"{name}: the best perplexity ({num(best.mean(METRIC), 2)}); every cheaper value is {how} "
            f"(nearest, {st.named(nearest)}: {_diff(diffs[id(nearest)])})"
        )
    else:
        evidence = f"{name}: the best perplexity ({num(best.mean(METRIC), 2)}) and the cheapest value"
    evidence += _unknown_costs(st, done)
    if provisional:
        evidence += "; provisional: one seed per value cannot tell a difference from noise (rerun with --seeds 3)"
    return Recommendation(pick, best, diffs.get(id(pick)), provisional, evidence)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (cost, ppl) points that no other point beats on both: none has cost and ppl both at most
    as high and one of them lower. Points tied on both are all kept."""
    return [
        i for i, (c, y) in enumerate(points) if not any(c2 <= c and y2 <= y and (c2 < c or y2 < y) for c2, y2 in points)
    ]


def front(st: Study, cost_metric: str) -> list[Value]:
    """The values of a study on the Pareto front of mean METRIC against mean `cost_metric`, cheapest first."""
    vs = [v for v in st.values if v.mean(METRIC) is not None and v.mean(cost_metric) is not None]
    keep = pareto_front([(v.mean(cost_metric), v.mean(METRIC)) for v in vs])
    return sorted((vs[i] for i in keep), key=lambda v: v.mean(cost_metric))
