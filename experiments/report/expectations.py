"""Expected vs observed: the seed README's expected findings per ablation and the published ones (LoRA, Hu et al.
2021; Biderman et al. 2024; Position Interpolation, Chen et al. 2023), each judged against the measured numbers of a
study with a verdict a careful reader would accept (direction, and noise when there are seeds: paired t-test over
seeds, Welch where the seeds do not pair)."""

from __future__ import annotations

from collections.abc import Callable

from experiments.report.checks import Check, Verdict
from experiments.report.fmt import diff_text, integer, mib, num
from experiments.report.stats import Difference, spearman
from experiments.report.studies import Study, Value


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
        return Check(expected, f"fewer than two values with a {what}", Verdict.NOT_TESTABLE)
    lo, hi = vs[0], vs[-1]
    a, b = lo.mean(metric), hi.mean(metric)
    ratio = b / a if a else float("inf")
    observed = f"{what} {fmt(a)} at {lo.short} → {fmt(b)} at {hi.short} (×{ratio:.2f}{_rho(rho)}); " + ", ".join(
        f"{v.short}: {fmt(v.mean(metric))}" for v in vs
    )
    d = hi.vs(lo, metric)
    if b > a and (rho is None or rho > 0):
        return _held(expected, observed, d)
    return Check(expected, observed, _not_held(d))


def _held(expected: str, observed: str, d: Difference) -> Check:
    """The direction is as expected; is the difference beyond noise? One seed cannot say."""
    verdict = Verdict.WITHIN_NOISE if d.significant is False else Verdict.HELD
    return Check(expected, observed, verdict, one_seed=d.significant is None)


def _not_held(d: Difference) -> Verdict:
    """The opposite direction; said to be within noise when the seeds cannot tell it from no difference."""
    return Verdict.NOT_HELD_WITHIN_NOISE if d.significant is False else Verdict.NOT_HELD


def _lower_is_better(st: Study, expected: str, best: Value, ref: Value, observed: str) -> Check:
    d = best.vs(ref, "val_ppl")
    return Check(expected, observed, Verdict.NOT_HELD) if d.diff >= 0 else _held(expected, observed, d)


def _ppl_list(vs: list[Value]) -> str:
    return ", ".join(f"{v.short}: {num(v.mean('val_ppl'))}" for v in vs)


def _sec_fmt(x: float) -> str:
    return f"{x:.1f} s"


def rank_checks(st: Study) -> list[Check]:
    x = lambda v: float(v.value)  # noqa: E731
    vs, _ = _trend(st, "val_ppl", x)
    exp = "Higher rank improves validation perplexity, up to a point"
    if len(vs) < 2:
        checks = [Check(exp, "fewer than two ranks finished", Verdict.NOT_TESTABLE)]
    else:
        best = min(vs, key=lambda v: v.mean("val_ppl"))
        lo, hi = vs[0], vs[-1]
        if best is lo:
            checks = [Check(exp, f"the smallest rank had the best ppl; {_ppl_list(vs)}", Verdict.NOT_HELD)]
        else:
            d = best.vs(lo, "val_ppl")
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
    checks.append(forgetting_check(st))
    return checks


def target_checks(st: Study) -> list[Check]:
    count = lambda v: float(len(str(v.value).split(",")))  # noqa: E731
    checks = []
    exp = "More target modules improve validation perplexity"
    vs, rho = _trend(st, "val_ppl", count)
    if len(vs) < 2 or count(vs[0]) == count(vs[-1]):
        checks.append(Check(exp, "needs values with different numbers of modules", Verdict.NOT_TESTABLE))
    else:
        fewest = min(vs, key=lambda v: (count(v), v.mean("val_ppl")))
        most = max(vs, key=lambda v: (count(v), -v.mean("val_ppl")))
        d = most.vs(fewest, "val_ppl")
        obs = (
            f"ppl {num(fewest.mean('val_ppl'))} with {fewest.short} → {num(most.mean('val_ppl'))} with "
            f"{most.short} ({diff_text(d, fewest.mean('val_ppl'))}{_rho(rho)} between module count and ppl); "
            f"{_ppl_list(vs)}"
        )
        check = _lower_is_better(st, exp, most, fewest, obs)
        if check.verdict is Verdict.HELD and rho is not None and rho > 0:  # the ends agree, the trend does not
            check.verdict, check.one_seed = Verdict.NOT_HELD, False
        checks.append(check)
    exp = "More target modules mean more trainable parameters"
    pv = [v for v in st.values if v.metric("trainable_params")]
    if len(pv) < 2:
        checks.append(Check(exp, "fewer than two values finished", Verdict.NOT_TESTABLE))
    else:
        monotone = all(
            v.mean("trainable_params") < w.mean("trainable_params") for v in pv for w in pv if count(v) < count(w)
        )
        obs = ", ".join(f"{v.short}: {integer(v.mean('trainable_params'))}" for v in sorted(pv, key=count))
        checks.append(Check(exp, obs, Verdict.HELD if monotone else Verdict.NOT_HELD))
    checks.append(qv_check(st))
    checks.append(forgetting_check(st))
    return checks


def _modules(st: Study, names: set[str]) -> Value | None:
    """The finished value of a target-modules study whose module set is exactly `names`."""
    return next((v for v in st.values if set(str(v.value).split(",")) == names and v.metric("val_ppl")), None)


def _per_k(gain: float, params: float) -> str:
    """ppl gained per 1,000 trainable parameters, to 3 significant digits (a real model's are tiny: 0.00141)."""
    return f"{1000 * gain / params:.3g}"


def qv_check(st: Study) -> Check:
    """The seed's "q,v matter most", read two ways: gain per trainable parameter (q,v against every other value),
    and what the rest of attention (k,o) and the MLP (fc1,fc2) each add on top of q,v, tested paired against each
    other. The published studies (Biderman et al. 2024; LoRA Without Regret 2025) found the MLP adds the most."""
    exp = "q_proj and v_proj matter most (they capture most of the gain)"
    qv = _modules(st, {"q_proj", "v_proj"})
    fin = [v for v in st.values if v.metric("val_ppl") and v.mean("trainable_params")]
    base = qv.mean("base_val_ppl") if qv else None
    if qv is None or base is None or len(fin) < 2:
        return Check(
            exp, "needs a finished [q_proj, v_proj] run, another value and the base model's ppl", Verdict.NOT_TESTABLE
        )
    gain = {id(v): base - v.mean("val_ppl") for v in fin}
    best = min(fin, key=lambda v: v.mean("val_ppl"))
    if gain[id(best)] <= 0:
        return Check(exp, f"no value improved on the base model's ppl {num(base)}", Verdict.NOT_TESTABLE)
    params = lambda v: v.mean("trainable_params")  # noqa: E731
    share = gain[id(qv)] / gain[id(best)]
    per_param = share >= 0.5 and all(gain[id(qv)] / params(qv) >= gain[id(v)] / params(v) for v in fin)
    obs = (
        f"(1) per parameter: base model {num(base)} → {num(best.mean('val_ppl'))} at best ({best.short}); q,v alone "
        f"reach {num(qv.mean('val_ppl'))}, {share:.0%} of that gain with {params(qv) / params(best):.0%} of its "
        "parameters; ppl gained per 1k parameters: "
        + ", ".join(f"{v.short} {_per_k(gain[id(v)], params(v))}" for v in fin)
    )
    ko, mlp = _modules(st, {"q_proj", "v_proj", "k_proj", "out_proj"}), _modules(st, {"q_proj", "v_proj", "fc1", "fc2"})
    marginal, one_seed = True, False  # (2) holds: the MLP adds no more than the rest of attention (or untested)
    if ko is not None and mlp is not None:
        d = mlp.vs(ko, "val_ppl")
        one_seed = d.significant is None  # then the direction alone decides, as in every 1-seed verdict
        marginal = not (d.diff < 0 and d.significant is not False)
        add = lambda v: qv.mean("val_ppl") - v.mean("val_ppl")  # noqa: E731
        obs += (
            f". (2) on top of q,v: the MLP (fc1,fc2) gains {add(mlp):.2f} ppl "
            f"({_per_k(add(mlp), params(mlp) - params(qv))} per 1k added parameters), the rest of attention (k,o) "
            f"{add(ko):.2f} "
            f"({_per_k(add(ko), params(ko) - params(qv))}); q,v+MLP − q,v+k,o: {diff_text(d, ko.mean('val_ppl'))}"
        )
    if per_param and marginal:
        verdict, why = Verdict.HELD, "Both readings hold"
    elif per_param:
        verdict, why = (
            Verdict.PARTLY_HELD,
            (
                "(1) holds, (2) does not: q,v give the most gain per parameter, but beyond them the MLP adds more than "
                "the rest of attention, as Biderman et al. 2024 and LoRA Without Regret (2025) found"
            ),
        )
    elif marginal:
        verdict, why = (
            Verdict.PARTLY_HELD,
            "(2) holds, (1) does not: q,v reach under half the gain or less gain per parameter",
        )
    else:
        verdict, why = Verdict.NOT_HELD, "Neither reading holds"
    rule = "held needs ≥ 50% of the best gain, the most gain per parameter, and the MLP adding no more than k,o"
    return Check(exp, f"{obs}. {why} ({rule}).", verdict, one_seed=one_seed)


def forgetting_check(st: Study) -> Check:
    """Biderman et al. 2024: more capacity (rank, modules) learns more of the target and forgets more of the
    source. Compared between the values with the fewest and the most trainable parameters, paired over seeds."""
    exp = "More capacity learns more and forgets more (Biderman et al. 2024)"
    if st.source_note:
        return Check(exp, f"no source ppl: {st.source_note}", Verdict.NOT_TESTABLE)
    vs = sorted(
        (v for v in st.values if v.metric("val_ppl") and v.metric("source_val_ppl") and v.mean("trainable_params")),
        key=lambda v: v.mean("trainable_params"),
    )
    if len(vs) < 2 or vs[0].mean("trainable_params") == vs[-1].mean("trainable_params"):
        return Check(exp, "needs finished values with different trainable parameter counts", Verdict.NOT_TESTABLE)
    lo, hi = vs[0], vs[-1]
    learn, forget = hi.vs(lo, "val_ppl"), hi.vs(lo, "source_val_ppl")
    rho = spearman([v.mean("trainable_params") for v in vs], [v.mean("source_val_ppl") for v in vs])
    obs = (
        f"{lo.short} ({integer(lo.mean('trainable_params'))} params) → {hi.short} "
        f"({integer(hi.mean('trainable_params'))}): target ppl {num(lo.mean('val_ppl'))} → {num(hi.mean('val_ppl'))} "
        f"({diff_text(learn, lo.mean('val_ppl'))}); source ppl {num(lo.mean('source_val_ppl'))} → "
        f"{num(hi.mean('source_val_ppl'))} ({diff_text(forget, lo.mean('source_val_ppl'))}){_rho(rho)} between "
        "parameters and source ppl"
    )
    if learn.diff >= 0:
        return Check(exp, obs + "; more capacity did not learn more", Verdict.NOT_HELD)
    if forget.diff <= 0:
        return Check(exp, obs + "; more capacity learned more without forgetting more", _not_held(forget))
    sig = (learn.significant, forget.significant)
    if None in sig:
        return Check(exp, obs, Verdict.HELD, one_seed=True)
    return Check(exp, obs, Verdict.HELD if all(sig) else Verdict.WITHIN_NOISE)


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
        checks.append(Check(exp, "fewer than two lengths finished", Verdict.NOT_TESTABLE))
    else:
        best = min(vs, key=lambda v: v.mean("val_ppl"))
        obs = f"{_ppl_list(vs)}{_rho(rho)}; each evaluated at its own context length"
        # Lengths past the best that are significantly worse: an effect against the expectation, never hidden behind
        # a "within noise" between the shortest and the best.
        worse = [(v, d) for v in vs[vs.index(best) + 1 :] if (d := v.vs(best, "val_ppl")).significant and d.diff > 0]
        if worse:
            obs += f"; longer than {best.short} is significantly worse: " + ", ".join(
                f"{v.short}: {diff_text(d, digits=3, verdict=False)}" for v, d in worse
            )
        if best is vs[0]:
            checks.append(Check(exp, obs, Verdict.NOT_HELD))
        else:
            check = _lower_is_better(st, exp, best, vs[0], obs)
            if worse:  # a significant gain up to the best, then a significant loss: partly; no gain: did not hold
                check.verdict = Verdict.PARTLY_HELD if check.verdict is Verdict.HELD else Verdict.NOT_HELD
            checks.append(check)
    checks.append(base_context_check(st))
    return checks


FLAT = 0.005  # a step of the base's ppl within ±0.5% reads as flat


def base_context_check(st: Study) -> Check:
    """Sanity line: every token sees at least as much context at a longer length, so the base model's own ppl
    should not rise with it. A rise means the base extrapolates past what it was trained on (Chen et al. 2023:
    positions past the pretrained length give catastrophic attention), and the ablation measures that."""
    exp = "The base model's own val ppl does not rise as context grows (each token sees at least as much context)"
    vs = sorted((v for v in st.values if v.metric("base_val_ppl")), key=lambda v: float(v.value))
    if len(vs) < 2:
        return Check(exp, "fewer than two lengths with the base model's ppl", Verdict.NOT_TESTABLE)
    ppl = [v.mean("base_val_ppl") for v in vs]
    steps = [b / a - 1.0 for a, b in zip(ppl, ppl[1:])]
    obs = "base model before fine-tuning: " + ", ".join(f"{v.short}: {num(p)}" for v, p in zip(vs, ppl))
    rises = [i for i, s in enumerate(steps) if s > FLAT]
    if rises:
        i = rises[0]
        caveat = (
            f"the base model's own ppl rises past context {vs[i].short}: this ablation measures extrapolation, "
            "not the value of context"
        )
        return Check(
            exp,
            f"{obs}; it rises from {num(ppl[i])} at {vs[i].short} to {num(ppl[i + 1])} at {vs[i + 1].short} "
            f"({steps[i]:+.1%}): past the length it was pretrained at the base extrapolates, so this ablation "
            "measures extrapolation, not the value of context",
            Verdict.NOT_HELD,
            caveat,
        )
    flat_from = next(i for i in range(len(steps) + 1) if all(abs(s) <= FLAT for s in steps[i:]))
    if flat_from == len(steps):
        tail = "falls at every step: more context helps the base, so the ablation measures what context is worth"
        return Check(exp, f"{obs}; {tail}", Verdict.HELD)
    where = "at any length" if flat_from == 0 else f"beyond {vs[flat_from].short}"
    tail = (
        "flat at every length" if flat_from == 0 else f"falls up to {vs[flat_from].short}, flat beyond"
    ) + f" (within {FLAT:.1%} step to step): the base gains nothing from more context {where}, so LoRA cannot either"
    caveat = f"the base model gains nothing from more context {where}, so neither can LoRA"
    return Check(exp, f"{obs}; {tail}", Verdict.HELD, caveat)


CHECKS = {
    "lora.rank": rank_checks,
    "lora.target_modules": target_checks,
    "model.max_position_embeddings": context_checks,
}


def expectations(st: Study) -> list[Check]:
    fn = CHECKS.get(st.key)
    return fn(st) if fn else []
