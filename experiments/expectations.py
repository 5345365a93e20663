"""Expected vs observed: the seed README's expected findings per ablation, each judged against the measured
numbers of a study with a verdict a careful reader would accept (direction, and noise when there are seeds)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from experiments.fmt import diff_text, integer, mib, num
from experiments.stats import Difference, spearman, welch
from experiments.studies import LEVEL, Study, Value


@dataclass
class Check:
    expected: str
    observed: str
    verdict: str  # "held" | "did not hold" | "did not hold (within noise)" | "within noise" | "not testable"


def _trend(st: Study, metric: str, x: Callable[[Value], float]) -> tuple[list[Value], float | None]:
    """The values with that metric, in x order, and Spearman's rho between x and the metric's means."""
    vs = sorted([v for v in st.values if v.metric(metric)], key=x)
    return vs, spearman([x(v) for v in vs], [v.mean(metric) for v in vs])


def _rho(r: float | None) -> str:
    return "" if r is None else f", Spearman ρ = {r:+.2f}"


def _increase_check(
    st: Study, expected: str, metric: str, what: str, fmt: Callable[[float], str], x: Callable[[Value], float]
) -> Check:
    """ "metric grows with x": held if the largest x's mean exceeds the smallest's and the rank correlation is
    positive; with seeds, a difference within noise is said so."""
    vs, rho = _trend(st, metric, x)
    if len(vs) < 2:
        return Check(expected, f"fewer than two values with a {what}", "not testable")
    lo, hi = vs[0], vs[-1]
    a, b = lo.mean(metric), hi.mean(metric)
    ratio = b / a if a else float("inf")
    observed = f"{what} {fmt(a)} at {lo.short} → {fmt(b)} at {hi.short} (×{ratio:.2f}{_rho(rho)}); " + ", ".join(
        f"{v.short}: {fmt(v.mean(metric))}" for v in vs
    )
    d = welch(hi.metric(metric), lo.metric(metric), LEVEL)
    if b > a and (rho is None or rho > 0):
        return Check(expected, observed, _held(d))
    return Check(expected, observed, "did not hold (within noise)" if d.significant is False else "did not hold")


def _held(d: Difference) -> str:
    """The direction is as expected; is the difference beyond noise? One seed cannot say."""
    return {True: "held", False: "within noise", None: "held (1 seed)"}[d.significant]


def _lower_is_better(st: Study, expected: str, best: Value, ref: Value, observed: str) -> Check:
    d = welch(best.metric("val_ppl"), ref.metric("val_ppl"), LEVEL)
    return Check(expected, observed, "did not hold" if d.diff >= 0 else _held(d))


def _ppl_list(vs: list[Value]) -> str:
    return ", ".join(f"{v.short}: {num(v.mean('val_ppl'))}" for v in vs)


def _sec_fmt(x: float) -> str:
    return f"{x:.1f} s"


def rank_checks(st: Study) -> list[Check]:
    x = lambda v: float(v.value)  # noqa: E731
    vs, _ = _trend(st, "val_ppl", x)
    exp = "Higher rank improves validation perplexity, up to a point"
    if len(vs) < 2:
        checks = [Check(exp, "fewer than two ranks finished", "not testable")]
    else:
        best = min(vs, key=lambda v: v.mean("val_ppl"))
        lo, hi = vs[0], vs[-1]
        if best is lo:
            checks = [Check(exp, f"the smallest rank had the best ppl; {_ppl_list(vs)}", "did not hold")]
        else:
            d = welch(best.metric("val_ppl"), lo.metric("val_ppl"), LEVEL)
            tail = (
                f"; no gain beyond rank {best.short} (rank {hi.short}: {num(hi.mean('val_ppl'))})"
                if best is not hi
                else "; still improving at the largest rank tested"
            )
            obs = (
                f"ppl {num(lo.mean('val_ppl'))} at rank {lo.short} → {num(best.mean('val_ppl'))} at rank "
                f"{best.short} ({diff_text(d, lo.mean('val_ppl'))}){tail}; {_ppl_list(vs)}"
            )
            checks = [_lower_is_better(st, exp, best, lo, obs)]
    checks.append(
        _increase_check(st, "Higher rank costs more training time", "train_time_s", "train time", _sec_fmt, x)
    )
    checks.append(
        _increase_check(st, "Higher rank costs more memory (peak)", "peak_memory_bytes", "peak memory", mib, x)
    )
    checks.append(
        _increase_check(
            st,
            "Higher rank costs more memory (activations saved for backward)",
            "saved_for_backward_bytes",
            "saved for backward",
            mib,
            x,
        )
    )
    return checks


def target_checks(st: Study) -> list[Check]:
    count = lambda v: float(len(str(v.value).split(",")))  # noqa: E731
    checks = []
    exp = "More target modules improve validation perplexity"
    vs, rho = _trend(st, "val_ppl", count)
    if len(vs) < 2 or count(vs[0]) == count(vs[-1]):
        checks.append(Check(exp, "needs values with different numbers of modules", "not testable"))
    else:
        fewest = min(vs, key=lambda v: (count(v), v.mean("val_ppl")))
        most = max(vs, key=lambda v: (count(v), -v.mean("val_ppl")))
        d = welch(most.metric("val_ppl"), fewest.metric("val_ppl"), LEVEL)
        obs = (
            f"ppl {num(fewest.mean('val_ppl'))} with {fewest.short} → {num(most.mean('val_ppl'))} with "
            f"{most.short} ({diff_text(d, fewest.mean('val_ppl'))}{_rho(rho)} between module count and ppl); "
            f"{_ppl_list(vs)}"
        )
        verdict = _lower_is_better(st, exp, most, fewest, obs)
        if verdict.verdict.startswith("held") and rho is not None and rho > 0:
            verdict.verdict = "did not hold"
        checks.append(verdict)
    exp = "More target modules mean more trainable parameters"
    pv = [v for v in st.values if v.metric("trainable_params")]
    if len(pv) < 2:
        checks.append(Check(exp, "fewer than two values finished", "not testable"))
    else:
        monotone = all(
            v.mean("trainable_params") < w.mean("trainable_params") for v in pv for w in pv if count(v) < count(w)
        )
        obs = ", ".join(f"{v.short}: {integer(v.mean('trainable_params'))}" for v in sorted(pv, key=count))
        checks.append(Check(exp, obs, "held" if monotone else "did not hold"))
    exp = "q_proj and v_proj matter most (they capture most of the gain)"
    qv = next((v for v in st.values if set(str(v.value).split(",")) == {"q_proj", "v_proj"} and v.ok), None)
    fin = [v for v in st.values if v.metric("val_ppl")]
    base_ppl = qv.mean("base_val_ppl") if qv else None
    if qv is None or base_ppl is None or len(fin) < 2:
        checks.append(
            Check(exp, "needs a finished [q_proj, v_proj] run, another value and the base model's ppl", "not testable")
        )
    else:
        best = min(fin, key=lambda v: v.mean("val_ppl"))
        gain_best, gain_qv = base_ppl - best.mean("val_ppl"), base_ppl - qv.mean("val_ppl")
        if gain_best <= 0:
            checks.append(Check(exp, f"no value improved on the base model's ppl {num(base_ppl)}", "not testable"))
        else:
            share = gain_qv / gain_best
            obs = (
                f"fine-tuning lowers ppl from {num(base_ppl)} (base model) to {num(best.mean('val_ppl'))} at "
                f"best ({best.short}); q,v alone reach {num(qv.mean('val_ppl'))}: {share:.0%} of that gain "
                f"with {integer(qv.mean('trainable_params'))} of {integer(best.mean('trainable_params'))} params "
                f"(held if ≥ 50%)"
            )
            obs += _added_modules(st, qv)
            checks.append(Check(exp, obs, "held" if share >= 0.5 else "did not hold"))
    return checks


def _added_modules(st: Study, qv: Value) -> str:
    """What adding the rest of attention, or the MLP, to q,v buys: the seed's 'attention matters most' in numbers."""
    parts = []
    for extra, name in (({"k_proj", "out_proj"}, "k,o (rest of attention)"), ({"fc1", "fc2"}, "fc1,fc2 (MLP)")):
        v = next((v for v in st.values if set(str(v.value).split(",")) == {"q_proj", "v_proj"} | extra and v.ok), None)
        if v is not None:
            parts.append(f"adding {name}: {v.mean('val_ppl') - qv.mean('val_ppl'):+.3f} ppl")
    return ("; " + ", ".join(parts)) if parts else ""


def context_checks(st: Study) -> list[Check]:
    x = lambda v: float(v.value)  # noqa: E731
    checks = [
        _increase_check(
            st, "Longer context is slower (same tokens, more time)", "train_time_s", "train time", _sec_fmt, x
        ),
        _increase_check(st, "Longer context uses more memory (peak)", "peak_memory_bytes", "peak memory", mib, x),
        _increase_check(
            st,
            "Longer context uses more memory (activations saved for backward)",
            "saved_for_backward_bytes",
            "saved for backward",
            mib,
            x,
        ),
    ]
    exp = "Longer context lowers validation perplexity (broader dependencies)"
    vs, rho = _trend(st, "val_ppl", x)
    if len(vs) < 2:
        checks.append(Check(exp, "fewer than two lengths finished", "not testable"))
    else:
        best = min(vs, key=lambda v: v.mean("val_ppl"))
        obs = (
            f"{_ppl_list(vs)}{_rho(rho)}; base model before fine-tuning: "
            + ", ".join(f"{v.short}: {num(v.mean('base_val_ppl'))}" for v in vs)
            + " (each evaluated at its own context length)"
        )
        if best is vs[0]:
            checks.append(Check(exp, obs, "did not hold"))
        else:
            checks.append(_lower_is_better(st, exp, best, vs[0], obs))
    return checks


CHECKS = {
    "lora.rank": rank_checks,
    "lora.target_modules": target_checks,
    "model.max_position_embeddings": context_checks,
}


def expectations(st: Study) -> list[Check]:
    fn = CHECKS.get(st.key)
    return fn(st) if fn else []
