"""The report of a results folder: `python -m experiments.report RUN_DIR` -> RUN_DIR/report.md + plots/*.png.

It opens with the answers (a recommended value per study, experiments.report.recommend), then one table per study (an
ablation's values under one shared config) with the alpha policy and token budget, its plots, and an "expected vs
observed" section that tests the seed README's and the literature's findings against the measured numbers.
Differences from the baseline are paired over seeds (same data order and LoRA init): "significant" means the 95%
CI of the mean per-seed difference excludes zero; Welch's unpaired test where the seeds do not pair, and with one
seed per value a difference is reported without a verdict on noise.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from experiments.report.checks import Check
from experiments.report.compare import compare_folders, short_base
from experiments.report.concurrency import concurrency_note
from experiments.report.expectations import expectations
from experiments.report.fmt import EMPTY, ci, diff_text, integer, md_table, mib, num
from experiments.report.grid import Budget, add_budget_flags, budget_from_args, grid_section, is_rung, plot_grids
from experiments.report.recommend import RULE, recommend
from experiments.report.studies import LEVEL, Study, Value, load_studies
from experiments.sweep.results import PLOTS_DIR, REPORT_FILE, RESULTS_JSONL, ResultsFileError


def _status(v: Value) -> str:
    c = Counter(r["status"] for r in v.rows)
    return ", ".join(f"{s} {n}/{len(v.rows)}" if len(v.rows) > 1 else s for s, n in sorted(c.items()))


def _delta_cell(v: Value, base: Value | None, metric: str) -> str | None:
    """The Δ-vs-baseline cell: paired (or Welch) difference with its CI (fmt.diff_text), "baseline", or empty."""
    if v is base:
        return "baseline" if v.metric(metric) else None
    d = v.vs(base, metric) if base is not None else None
    return None if d is None else diff_text(d, base.mean(metric))


def _source(v: Value) -> str:
    """Source-set ppl after fine-tuning with its CI, and the mean forgetting (after / before - 1)."""
    forgetting = v.mean("forgetting")
    return ci(v.summary("source_val_ppl")) + ("" if forgetting is None else f" ({forgetting:+.2%})")


def study_table(st: Study) -> str:
    """value | val ppl (mean ± 95% CI) | Δ vs baseline | source ppl (forgetting) | Δ source | train time | tokens/s |
    peak memory | saved for backward | trainable params | status"""
    base = st.baseline
    out = [
        [
            f"**{v.label}**" if v is base else v.label,
            ci(v.summary("val_ppl")),
            _delta_cell(v, base, "val_ppl"),
            _source(v),
            _delta_cell(v, base, "source_val_ppl"),
            f"{len(v.ok)}/{len(v.rows)}",
            ci(v.summary("train_time_s"), 1),
            integer(v.mean("tokens_per_s")),
            mib(v.mean("peak_memory_bytes")),
            mib(v.mean("saved_for_backward_bytes")),
            integer(v.mean("trainable_params")),
            _status(v),
        ]
        for v in st.values
    ]
    header = [
        "value",
        f"val ppl (± {LEVEL:.0%} CI)",
        "Δ ppl vs baseline",
        "source ppl (forgetting)",
        "Δ source ppl vs baseline",
        "seeds ok",
        "train time (s)",
        "tokens/s",
        "peak memory",
        "saved for backward",
        "trainable params",
        "status",
    ]
    if st.lr_grid:  # each value is reported at the learning rate its tune split chose
        header.insert(1, "chosen lr")
        for row, v in zip(out, st.values):
            row.insert(1, None if v.chosen_lr is None else f"{v.chosen_lr:g}")
    return md_table(header, out)


def adapted_note(st: Study) -> list[str]:
    """What each value's target names resolved to on this base, with LoRA's parameter count: the same name
    (`fc1`, `attention`) means other modules on another architecture. Only for rows that record it."""
    if "target_modules" not in st.key:
        return []
    rows = []
    for v in st.values:
        modules = sorted({r["adapted_modules"] for r in v.ok if r.get("adapted_modules")})
        if modules:
            rows.append([v.label, "; ".join(modules), integer(v.mean("trainable_params"))])
    if not rows:
        return []
    table = md_table(["value", "modules", "trainable params"], rows)
    return ["", "Modules each value adapted on this base:", "", table]


def lr_grid_note(st: Study) -> list[str]:
    """How the learning rates were chosen, and a warning when a choice sits at an edge of the grid."""
    if not st.lr_grid:
        return []
    lines = [
        f"Learning-rate grid {', '.join(f'{lr:g}' for lr in st.lr_grid)}: every value trained at each; the table "
        "shows each value at the lr with the lowest mean loss on a tune split (documents held out from both "
        "training and validation), so the validation numbers played no part in the choice."
    ]
    edge = st.lr_at_edge()
    if edge:
        lines.append(
            f"The chosen lr of {', '.join(st.named(v) for v in edge)} is at an edge of the grid: the best lr may lie "
            "outside it; widen the grid to be sure."
        )
    return [" ".join(lines), ""]


def _alpha_text(rows: list[dict]) -> str:
    policies = {(r.get("alpha_policy"), r.get("lora_alpha")) for r in rows}
    policy = next(iter(policies))[0] if len({p for p, _ in policies}) == 1 else None
    alphas = sorted({a for _, a in policies if a is not None})
    if policy == "fixed":
        return f"fixed, alpha = {', '.join(num(a, 1) for a in alphas)} (scaling alpha/rank shrinks as rank grows)"
    if policy == "double_rank":
        return "double_rank, alpha = 2·rank (scaling 2 at every rank)"
    if policy == "rslora":
        return f"rslora, alpha = {', '.join(num(a, 1) for a in alphas)} (scaling alpha/√rank)"
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
    bases = sorted({r["base_model"] for r in rows if r.get("base_model")})
    lines = [f"- base model: {'; '.join(_base_text(b) for b in bases)}"] if bases else []
    lines += [
        f"- swept key: `{st.key}`; baseline: {st.baseline.label if st.baseline else EMPTY}; "
        f"seeds: {', '.join(map(str, seeds))} ({len(seeds)} per value)",
        f"- alpha policy: {_alpha_text(rows)}",
        f"- token budget: {budget}; validation: the same held-out documents, up to "
        f"{', '.join(f'{e:,}' for e in evals)} tokens, windows at each run's context length",
        f"- device: {'; '.join(devices) or EMPTY}; "
        f"torch {', '.join(sorted({str(r.get('torch_version')) for r in ok})) or EMPTY}; "
        f"git {', '.join(sorted({str(r.get('git_commit'))[:10] for r in rows}))}",
    ]
    lines += [note] if (note := concurrency_note(ok)) else []  # train times compare only at equal concurrency
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


def _base_text(base: str) -> str:
    """The base model as the header names it; a GGUF file's weights are what it stores, dequantized: for a quantized
    file (Q4_1, Q8_0, ...) a rounded copy of the released weights, not the original."""
    if base == "builtin":
        return "the built-in base (a small GPT pretrained here on the Python standard library)"
    if base.endswith(".gguf"):
        return (
            f"`{Path(base).name}`, a GGUF file dequantized to float32: for a quantized file a rounded copy of the "
            "released weights, not the original"
        )
    return f"`{short_base(base)}`"


def _title(st: Study) -> str:
    """The ablation, with its alpha policy when it sweeps the rank (a rank sweep means different things under
    each); the study hash when the ablation has several studies."""
    return st.ablation + _policy(st) + (f" (study {st.study_hash[:8]})" if st.differs else "")


def _policy(st: Study) -> str:
    if st.key != "lora.rank":
        return ""
    policies = sorted({str(r.get("alpha_policy")) for r in st.rows if r.get("alpha_policy")})
    return f", alpha policy {'/'.join(policies)}" if policies else ""


def answers(studies: list[Study]) -> list[str]:
    """One line per study: its recommended value and the evidence (experiments.report.recommend)."""
    lines = []
    for st in studies:
        rec = recommend(st)
        caveats = "".join(f"; **caution**: {c.caveat}" for c in expectations(st) if c.caveat)
        name = st.ablation + (f" (study {st.study_hash[:8]})" if st.differs else "")
        lines.append(f"- **{name}** (`{st.key}`): {rec.evidence if rec else 'no finished run'}{caveats}")
    return lines


def _verdict_counts(checks: list[Check]) -> str:
    counts = Counter(c.text for c in checks)
    return ", ".join(f"{n} {v}" for v, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _image(plots: dict[str, Path], name: str, alt: str, out_dir: Path | None) -> list[str]:
    if name not in plots:
        return []
    rel = plots[name].relative_to(out_dir) if out_dir else plots[name]
    return [f"![{alt}]({rel.as_posix()})", ""]


def render(
    studies: list[Study],
    plots: dict[str, Path] | None = None,
    out_dir: Path | None = None,
    budget: Budget | None = None,
) -> str:
    plots = plots or {}
    everything, studies = studies, [s for s in studies if not is_rung(s)]  # halving's early rungs: in their grid's part
    parts = ["# LoRA ablation report", "", "## Answers", "", RULE, "", *answers(studies), ""]
    parts += [
        f"{len(studies)} stud{'y' if len(studies) == 1 else 'ies'}, {sum(len(s.rows) for s in studies)} runs "
        f"(latest row per run in {RESULTS_JSONL}). Val ppl is the final validation perplexity, mean ± "
        f"{LEVEL:.0%} t-interval over seeds. Δ vs baseline: runs at the same seed share the data order and the "
        f"LoRA initialisation, so Δ is the mean of the per-seed differences with a {LEVEL:.0%} t-interval on them "
        "(*paired*); *Welch* marks a value whose seeds do not pair with the baseline's (unpaired test); "
        f"*significant* = the {LEVEL:.0%} CI of the difference excludes 0. Source ppl: perplexity on held-out text "
        "of the base model's own domain after fine-tuning, and in brackets the forgetting (source ppl after / "
        "before fine-tuning − 1). Peak memory: CUDA allocator peak on GPU, process peak RSS on CPU; saved for "
        "backward: activation bytes one micro-batch keeps for backward (the same on any device).",
        "",
    ]
    for st in studies:
        title = _title(st)
        parts += [f"## {title}", "", study_header(st), "", study_table(st), *adapted_note(st), "", *lr_grid_note(st)]
        if st.source_note:
            parts += [f"Source ppl columns are empty: {st.source_note}.", ""]
        parts += _image(plots, st.slug, title, out_dir)
        parts += _image(plots, f"{st.slug}_tradeoff", f"{title}: perplexity against cost", out_dir)
        parts += _image(plots, f"{st.slug}_forgetting", f"{title}: learning against forgetting", out_dir)
        parts += _image(plots, f"{st.slug}_lr", f"{title}: validation perplexity against learning rate", out_dir)
        parts += grid_section(st, everything, plots, out_dir, budget)  # a grid study's two-way tables; else nothing
        checks = expectations(st)
        if checks:
            single = (
                " (with one seed per value: direction only, no test against noise)"
                if any(c.one_seed for c in checks)
                else ""
            )
            parts += [
                "### Expected vs observed",
                "",
                f"Of {len(checks)} expectations (the seed README's and the literature's): {_verdict_counts(checks)}"
                f"{single}. Verdicts are computed from the table above: *held* = the expected direction, beyond "
                "noise (paired t-test, 95%) when there are seeds; *within noise* = the expected direction, but not "
                'significant; *did not hold* = the opposite direction ("within noise" added when the seeds cannot '
                "tell it from no difference); *partly held* = the readings the row gives disagree.",
                "",
                md_table(
                    ["expected", "observed", "verdict"], [[c.expected, c.observed, f"**{c.text}**"] for c in checks]
                ),
                "",
            ]
    if "ppl_vs_params" in plots:
        parts += ["## Perplexity against trainable parameters (all runs)", ""]
        parts += _image(plots, "ppl_vs_params", "ppl vs params", out_dir)
    return "\n".join(parts)


def terminal_summary(studies: list[Study]) -> str:
    """The tables, the recommended value (with the rule) and the verdicts for the terminal at the end of a sweep."""
    parts = []
    for st in studies:
        parts += [f"== {st.ablation} ({st.key}{'; ' + st.differs if st.differs else ''})", study_table(st)]
        rec, checks = recommend(st), expectations(st)
        if rec is not None:
            parts.append(f"  recommended: {rec.evidence}")
            parts += [f"  caution: {c.caveat}" for c in checks if c.caveat]
        parts += [f"  [{c.text}] {c.expected}" for c in checks]
        parts.append("")
    if studies:
        parts += [f"Rule: {RULE}", ""]
    return "\n".join(parts)


def write_report(
    out_dir: Path,
    ablations: set[tuple[str, str]] | None = None,
    plots: bool = True,
    budget: Budget | None = None,
    compare: Path | None = None,
    labels: tuple[str | None, str | None] = (None, None),
) -> str:
    """Write out_dir/report.md (+ plots/*.png) from every study in the folder, and with `compare` (another results
    folder) the section comparing the two, `labels` naming them (experiments.report.compare). Returns the terminal
    summary of the studies in `ablations` ((name, study hash) pairs; all if None)."""
    out_dir = Path(out_dir)
    studies = load_studies(out_dir)
    # Read the other folder before anything is written: a broken one leaves this folder's report as it was.
    section = "" if compare is None else "\n" + compare_folders(out_dir, studies, compare, labels)
    files: dict[str, Path] = {}
    if plots and studies:
        from experiments.report.plots import plot_all

        files = plot_all(studies, out_dir / PLOTS_DIR) | plot_grids(studies, out_dir / PLOTS_DIR)
    (out_dir / REPORT_FILE).write_text(render(studies, files, out_dir, budget) + section, encoding="utf-8")
    shown = [s for s in studies if (ablations is None or (s.ablation, s.study_hash) in ablations) and not is_rung(s)]
    return terminal_summary(shown) + f"report: {out_dir / REPORT_FILE}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m experiments.report",
        description="Write RUN_DIR/report.md and RUN_DIR/plots/*.png from RUN_DIR/results.jsonl.",
    )
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--no-plots", action="store_true", help="tables only")
    ap.add_argument(
        "--compare",
        type=Path,
        metavar="OTHER_DIR",
        help="another results folder with the same ablations on another base: appends a section comparing them",
    )
    ap.add_argument("--label", help="this folder's name in that section (default: its base model)")
    ap.add_argument("--compare-label", help="the other folder's name in that section (default: its base model)")
    add_budget_flags(ap)
    args = ap.parse_args(argv)
    if not (args.run_dir / RESULTS_JSONL).exists():
        print(
            f"error: {args.run_dir / RESULTS_JSONL} does not exist; run python -m experiments.run --out "
            f"{args.run_dir} first.",
            file=sys.stderr,
        )
        return 2
    try:
        labels = (args.label, args.compare_label)
        budget = budget_from_args(args)
        print(write_report(args.run_dir, plots=not args.no_plots, budget=budget, compare=args.compare, labels=labels))
    except ResultsFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an unwritable report.md or plots/ (permissions, an immutable file, a full disk)
        print(f"error: {unwritable(args.run_dir, e)}", file=sys.stderr)
        return 2
    return 0


def unwritable(out_dir: Path, e: OSError) -> str:
    """One line for a report that could not be written: the file, why, and the way out."""
    where = e.filename or out_dir
    if isinstance(e, (FileExistsError, NotADirectoryError)):
        return f"cannot write the report: {where} is a file where the report writes a folder; move it away."
    if isinstance(e, IsADirectoryError):
        return f"cannot write the report: {where} is a folder where the report writes a file; move it away."
    return (
        f"cannot write the report: {where}: {e.strerror or e}. Make {out_dir} and its {PLOTS_DIR}/ (and the files "
        "in them) writable, or pass --no-plots to write report.md alone."
    )
