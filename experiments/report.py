"""The report of a results folder: `python -m experiments.report RUN_DIR` -> RUN_DIR/report.md + plots/*.png.

One table per study (an ablation's values under one shared config), the alpha policy and token budget, and an
"expected vs observed" section that tests the seed README's expected findings against the measured numbers.
Differences from the baseline use Welch's t-test over seeds: "significant" means the 95% CI of the difference
of means excludes zero (p < 0.05); with one seed per value a difference is reported without a verdict on noise.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from experiments.results import RESULTS_JSONL, latest, read_rows
from experiments.stats import Difference, Summary, mean_ci, spearman, welch

LEVEL = 0.95
SHORT = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "out_proj": "o"}


# ----------------------------------------------------------------------------- gathering


@dataclass
class Value:
    """One swept value of a study: its runs (one per seed, latest row each) and their summaries."""

    value: Any
    index: int | None
    is_baseline: bool
    rows: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> list[dict]:
        return [r for r in self.rows if r["status"] == "ok"]

    def metric(self, name: str) -> list[float]:
        return [float(r[name]) for r in self.ok if r.get(name) is not None]

    def summary(self, name: str) -> Summary | None:
        xs = self.metric(name)
        return mean_ci(xs, LEVEL) if xs else None

    def mean(self, name: str) -> float | None:
        s = self.summary(name)
        return s.mean if s else None

    @property
    def label(self) -> str:
        return "(no ablation)" if self.value is None else str(self.value)

    @property
    def short(self) -> str:
        """Short label for plots and prose: "q,v,fc1,fc2" for module lists."""
        if isinstance(self.value, str) and "," in self.value or self.value in SHORT:
            return ",".join(SHORT.get(m, m) for m in str(self.value).split(","))
        return self.label


@dataclass
class Study:
    """The rows of one ablation under one shared config (same study hash): what one table shows."""

    ablation: str
    key: str
    study_hash: str
    values: list[Value]
    differs: str = ""  # when an ablation has several studies: the settings that set this one apart

    @property
    def baseline(self) -> Value | None:
        return next((v for v in self.values if v.is_baseline), None)

    @property
    def rows(self) -> list[dict]:
        return [r for v in self.values for r in v.rows]

    @property
    def numeric(self) -> bool:
        return all(isinstance(v.value, (int, float)) and not isinstance(v.value, bool) for v in self.values)


def _config_of(out_dir: Path, row: dict) -> dict:
    try:
        return json.loads((out_dir / row["run_dir"] / "config.json").read_text(encoding="utf-8"))
    except (OSError, KeyError, TypeError, json.JSONDecodeError):
        return {}


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def load_studies(out_dir: Path) -> list[Study]:
    """The latest row per (ablation, config hash), grouped into studies, in the order they first appear."""
    out_dir = Path(out_dir)
    rows = list(latest(read_rows(out_dir)).values())
    studies: dict[tuple[str, str], Study] = {}
    for r in rows:
        st = studies.setdefault((r["ablation"], r["study_hash"]), Study(r["ablation"], r["key"], r["study_hash"], []))
        v = next((v for v in st.values if v.value == r["value"]), None)
        if v is None:
            v = Value(r["value"], r.get("value_index"), bool(r.get("is_baseline")))
            st.values.append(v)
        v.rows.append(r)
    for st in studies.values():
        for v in st.values:
            v.rows.sort(key=lambda r: r["seed"])
        if st.numeric:
            st.values.sort(key=lambda v: v.value)
        else:
            st.values.sort(key=lambda v: (v.index is None, v.index if v.index is not None else 0, v.label))
    _mark_differences(out_dir, list(studies.values()))
    return list(studies.values())


def _mark_differences(out_dir: Path, studies: list[Study]) -> None:
    """An ablation run under two different configs gets two tables; say what differs between them."""
    by_name: dict[str, list[Study]] = {}
    for st in studies:
        by_name.setdefault(st.ablation, []).append(st)
    for group in by_name.values():
        if len(group) < 2:
            continue
        flats = [_flat(_config_of(out_dir, st.rows[0])) for st in group]
        for st, flat in zip(group, flats):
            skip = {st.key, "train.seed"}
            keys = sorted(
                k
                for k in set().union(*flats)
                if k not in skip
                and k.split(".")[0] != "ablation"
                and len({json.dumps(f.get(k), default=str) for f in flats}) > 1
            )
            st.differs = ", ".join(f"{k}={flat.get(k)}" for k in keys) or "(configs not found)"


# ----------------------------------------------------------------------------- formatting


def _num(x: float | None, digits: int = 3) -> str:
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def _ci(s: Summary | None, digits: int = 3) -> str:
    if s is None:
        return "—"
    return f"{s.mean:.{digits}f} ± {s.half:.{digits}f}" if s.half is not None else f"{s.mean:.{digits}f}"


def _mib(x: float | None) -> str:
    return "—" if x is None else f"{x / 2**20:,.1f} MiB"


def _int(x: float | None) -> str:
    return "—" if x is None else f"{round(x):,}"


def _diff_text(d: Difference, base: float, digits: int = 3) -> str:
    rel = f" ({d.diff / base:+.2%})" if base else ""
    if d.significant is None:
        return f"{d.diff:+.{digits}f}{rel}, 1 seed"
    verdict = "significant" if d.significant else "within noise"
    return f"{d.diff:+.{digits}f} ± {d.half:.{digits}f}{rel}, {verdict}"


def _status(v: Value) -> str:
    c = Counter(r["status"] for r in v.rows)
    return ", ".join(f"{s} {n}/{len(v.rows)}" if len(v.rows) > 1 else s for s, n in sorted(c.items()))


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def study_table(st: Study) -> str:
    """value | val ppl (mean ± 95% CI) | Δ vs baseline | train time | tokens/s | peak memory | saved for backward |
    trainable params | status"""
    base = st.baseline
    out = []
    for v in st.values:
        ppl = v.summary("val_ppl")
        if v is base:
            delta = "baseline"
        elif base is None or ppl is None or not base.metric("val_ppl"):
            delta = "—"
        else:
            delta = _diff_text(welch(v.metric("val_ppl"), base.metric("val_ppl"), LEVEL), base.mean("val_ppl"))
        name = f"**{v.label}**" if v is base else v.label
        out.append(
            [
                name,
                _ci(ppl),
                delta,
                f"{len(v.ok)}/{len(v.rows)}",
                _ci(v.summary("train_time_s"), 1),
                _int(v.mean("tokens_per_s")),
                _mib(v.mean("peak_memory_bytes")),
                _mib(v.mean("saved_for_backward_bytes")),
                _int(v.mean("trainable_params")),
                _status(v),
            ]
        )
    return _table(
        [
            "value",
            f"val ppl (± {LEVEL:.0%} CI)",
            "Δ ppl vs baseline",
            "seeds ok",
            "train time (s)",
            "tokens/s",
            "peak memory",
            "saved for backward",
            "trainable params",
            "status",
        ],
        out,
    )


def _alpha_text(rows: list[dict]) -> str:
    policies = {(r.get("alpha_policy"), r.get("lora_alpha")) for r in rows}
    policy = next(iter(policies))[0] if len({p for p, _ in policies}) == 1 else None
    alphas = sorted({a for _, a in policies if a is not None})
    if policy == "fixed":
        return f"fixed, alpha = {', '.join(_num(a, 1) for a in alphas)} (scaling alpha/rank shrinks as rank grows)"
    if policy == "double_rank":
        return "double_rank, alpha = 2·rank (scaling 2 at every rank)"
    if policy == "rslora":
        return f"rslora, alpha = {', '.join(_num(a, 1) for a in alphas)} (scaling alpha/√rank)"
    return "mixed: " + ", ".join(f"{p} (alpha {a})" for p, a in sorted(policies, key=str))


def study_header(st: Study) -> str:
    rows = st.rows
    ok = [r for r in rows if r["status"] == "ok"]
    seeds = sorted({r["seed"] for r in rows})
    budgets = sorted({r["train_tokens"] for r in ok if r.get("train_tokens")})
    evals = sorted({r["eval_max_tokens"] for r in rows if r.get("eval_max_tokens")})
    budget = (
        f"{budgets[0]:,} training tokens per run, the same for every value"
        if len(budgets) == 1
        else f"WARNING: runs trained on different token counts ({', '.join(f'{b:,}' for b in budgets)})"
        if budgets
        else "no finished run"
    )
    devices = sorted({f"{r.get('device')}, {r.get('dtype')}, world size {r.get('world_size')}" for r in ok})
    lines = [
        f"- swept key: `{st.key}`; baseline: {st.baseline.label if st.baseline else '—'}; "
        f"seeds: {', '.join(map(str, seeds))} ({len(seeds)} per value)",
        f"- alpha policy: {_alpha_text(rows)}",
        f"- token budget: {budget}; validation: the same held-out documents, up to "
        f"{', '.join(f'{e:,}' for e in evals)} tokens, windows at each run's context length",
        f"- device: {'; '.join(devices) or '—'}; "
        f"torch {', '.join(sorted({str(r.get('torch_version')) for r in ok})) or '—'}; "
        f"git {', '.join(sorted({str(r.get('git_commit'))[:10] for r in rows}))}",
    ]
    if any(str(r.get("device", "")).startswith("cpu") for r in ok):
        lines.append(
            "- on CPU, peak memory is the process's peak RSS: Python, torch, the data pipeline and the model "
            "as well as training; the saved-for-backward column isolates activation memory"
        )
    if st.differs:
        lines.append(f"- this study's settings that differ from the other `{st.ablation}` studies: {st.differs}")
    failures = [r for r in rows if r["status"] != "ok"]
    for r in failures:
        err = (r.get("error") or "").strip().splitlines()
        lines.append(
            f"- **{r['status']}**: value {r['value']}, seed {r['seed']}"
            + (f" at step {r['diverged_step']}" if r.get("diverged_step") else "")
            + (f": `{err[-1][:300]}`" if err else "")
            + f" (see {r['run_dir']}/train.log)"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- expected vs observed


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
    return ", ".join(f"{v.short}: {_num(v.mean('val_ppl'))}" for v in vs)


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
                f"; no gain beyond rank {best.short} (rank {hi.short}: {_num(hi.mean('val_ppl'))})"
                if best is not hi
                else "; still improving at the largest rank tested"
            )
            obs = (
                f"ppl {_num(lo.mean('val_ppl'))} at rank {lo.short} → {_num(best.mean('val_ppl'))} at rank "
                f"{best.short} ({_diff_text(d, lo.mean('val_ppl'))}){tail}; {_ppl_list(vs)}"
            )
            checks = [_lower_is_better(st, exp, best, lo, obs)]
    checks.append(
        _increase_check(st, "Higher rank costs more training time", "train_time_s", "train time", _sec_fmt, x)
    )
    checks.append(
        _increase_check(st, "Higher rank costs more memory (peak)", "peak_memory_bytes", "peak memory", _mib, x)
    )
    checks.append(
        _increase_check(
            st,
            "Higher rank costs more memory (activations saved for backward)",
            "saved_for_backward_bytes",
            "saved for backward",
            _mib,
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
            f"ppl {_num(fewest.mean('val_ppl'))} with {fewest.short} → {_num(most.mean('val_ppl'))} with "
            f"{most.short} ({_diff_text(d, fewest.mean('val_ppl'))}{_rho(rho)} between module count and ppl); "
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
        obs = ", ".join(f"{v.short}: {_int(v.mean('trainable_params'))}" for v in sorted(pv, key=count))
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
            checks.append(Check(exp, f"no value improved on the base model's ppl {_num(base_ppl)}", "not testable"))
        else:
            share = gain_qv / gain_best
            obs = (
                f"fine-tuning lowers ppl from {_num(base_ppl)} (base model) to {_num(best.mean('val_ppl'))} at "
                f"best ({best.short}); q,v alone reach {_num(qv.mean('val_ppl'))}: {share:.0%} of that gain "
                f"with {_int(qv.mean('trainable_params'))} of {_int(best.mean('trainable_params'))} params "
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
        _increase_check(st, "Longer context uses more memory (peak)", "peak_memory_bytes", "peak memory", _mib, x),
        _increase_check(
            st,
            "Longer context uses more memory (activations saved for backward)",
            "saved_for_backward_bytes",
            "saved for backward",
            _mib,
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
            + ", ".join(f"{v.short}: {_num(v.mean('base_val_ppl'))}" for v in vs)
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


# ----------------------------------------------------------------------------- the report


def render(studies: list[Study], plots: dict[str, Path] | None = None, out_dir: Path | None = None) -> str:
    plots = plots or {}
    parts = [
        "# LoRA ablation report",
        "",
        f"{len(studies)} stud{'y' if len(studies) == 1 else 'ies'}, {sum(len(s.rows) for s in studies)} runs "
        f"(latest row per run in {RESULTS_JSONL}). Val ppl is the final validation perplexity, mean ± "
        f"{LEVEL:.0%} t-interval over seeds. Δ vs baseline: Welch's t-test; *significant* = the {LEVEL:.0%} CI of "
        "the difference excludes 0. Peak memory: CUDA allocator peak on GPU, process peak RSS on CPU; "
        "saved for backward: activation bytes one micro-batch keeps for backward (the same on any device).",
        "",
    ]
    for st in studies:
        title = st.ablation + (f" (study {st.study_hash[:8]})" if st.differs else "")
        parts += [f"## {title}", "", study_header(st), "", study_table(st), ""]
        name = _plot_name(st)
        if name in plots:
            rel = plots[name].relative_to(out_dir) if out_dir else plots[name]
            parts += [f"![{title}]({rel.as_posix()})", ""]
        checks = expectations(st)
        if checks:
            held = sum(c.verdict.startswith("held") for c in checks)
            single = (
                " (with one seed per value: direction only, no test against noise)"
                if any(c.verdict == "held (1 seed)" for c in checks)
                else ""
            )
            parts += [
                "### Expected vs observed",
                "",
                f"{held} of {len(checks)} expectations from the seed README held on these runs{single}. "
                "Verdicts are computed from the table above: *held* = the expected direction, beyond noise "
                "(Welch, 95%) when there are seeds; *within noise* = the expected direction, but not "
                'significant; *did not hold* = the opposite direction ("within noise" added when the seeds cannot '
                "tell it from no difference).",
                "",
                _table(
                    ["expected", "observed", "verdict"], [[c.expected, c.observed, f"**{c.verdict}**"] for c in checks]
                ),
                "",
            ]
    if "ppl_vs_params" in plots:
        rel = plots["ppl_vs_params"].relative_to(out_dir) if out_dir else plots["ppl_vs_params"]
        parts += [
            "## Perplexity against trainable parameters (all runs)",
            "",
            f"![ppl vs params]({rel.as_posix()})",
            "",
        ]
    return "\n".join(parts)


def _plot_name(st: Study) -> str:
    return st.ablation + (f"_{st.study_hash[:8]}" if st.differs else "")


def terminal_summary(studies: list[Study]) -> str:
    """The tables and verdicts for the terminal at the end of a sweep."""
    parts = []
    for st in studies:
        parts += [f"== {st.ablation} ({st.key}{'; ' + st.differs if st.differs else ''})", study_table(st)]
        for c in expectations(st):
            parts.append(f"  [{c.verdict}] {c.expected}")
        parts.append("")
    return "\n".join(parts)


def write_report(out_dir: Path, ablations: set[tuple[str, str]] | None = None, plots: bool = True) -> str:
    """Write out_dir/report.md (+ plots/*.png) from every study in the folder. Returns the terminal summary of
    the studies in `ablations` ((name, study hash) pairs; all if None)."""
    out_dir = Path(out_dir)
    studies = load_studies(out_dir)
    files: dict[str, Path] = {}
    if plots and studies:
        from experiments.plots import plot_all

        files = plot_all(studies, out_dir / "plots", name=_plot_name)
    (out_dir / "report.md").write_text(render(studies, files, out_dir), encoding="utf-8")
    shown = [s for s in studies if ablations is None or (s.ablation, s.study_hash) in ablations]
    return terminal_summary(shown) + f"report: {out_dir / 'report.md'}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m experiments.report",
        description="Write RUN_DIR/report.md and RUN_DIR/plots/*.png from RUN_DIR/results.jsonl.",
    )
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--no-plots", action="store_true", help="tables only")
    args = ap.parse_args(argv)
    if not (args.run_dir / RESULTS_JSONL).exists():
        print(
            f"error: {args.run_dir / RESULTS_JSONL} does not exist; run python -m experiments.run --out "
            f"{args.run_dir} first.",
            file=sys.stderr,
        )
        return 2
    print(write_report(args.run_dir, plots=not args.no_plots))
    return 0


if __name__ == "__main__":
    sys.exit(main())
