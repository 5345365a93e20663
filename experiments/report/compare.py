"""The same ablations run on two bases, side by side: `python -m experiments.report RUN_DIR --compare OTHER_DIR`
appends this section to RUN_DIR/report.md. Two bases' perplexities live on different scales (the toy base ~225, a
real model ~11), so effects are compared relatively (% of each study's own baseline) and by direction and
significance (each side's own paired test over seeds); the recommendations and the expectations' verdicts are each
side's own (recommend, expectations), set next to each other."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from experiments.report.checks import Check, Verdict
from experiments.report.expectations import FLAT, expectations
from experiments.report.fmt import diff_text, md_table, num
from experiments.report.grid import is_rung
from experiments.report.recommend import METRIC, recommend
from experiments.report.stats import Difference
from experiments.report.studies import Study, Value, load_studies, run_config
from experiments.sweep.results import RESULTS_JSONL, ResultsFileError

BUILTIN = "builtin"
TOY = "toy base"
CONTEXT = "model.max_position_embeddings"
AGREE, DISAGREE, NEITHER, NOT_COMPARABLE = "agree", "disagree", "neither significant", "not comparable"
DIFFERENT = "**no**"  # a verdict that differs between the bases, each tested over seeds

Labels = tuple[str, str]


def base_label(out_dir: Path, studies: list[Study]) -> str:
    """How a folder's base model reads: "toy base" for the built-in one, else the checkpoint's file or folder stem
    (the rows' base_model; rows older than that column: model.base in their runs' config.json). A published folder
    of such older rows keeps its rows but not its runs: then the folder's own name."""
    bases = sorted(
        {
            b
            for st in studies
            for r in st.rows
            if (b := r.get("base_model") or run_config(out_dir, r).get("model", {}).get("base"))
        }
    )
    if not bases:
        return Path(out_dir).resolve().name
    return "/".join(short_base(b) for b in bases)


def short_base(base: str) -> str:
    """A base model as a label: "toy base", a GGUF file's stem, a checkpoint folder's name."""
    return TOY if base == BUILTIN else Path(base).stem if Path(base).suffix == ".gguf" else Path(base).name


def load_other(out_dir: Path) -> list[Study]:
    """The studies of the folder compared with: a missing or unreadable results file is a ResultsFileError (one
    line, exit 2), like a broken row."""
    path = Path(out_dir) / RESULTS_JSONL
    if not path.is_file():
        raise ResultsFileError(f"--compare {out_dir}: {path} does not exist; give a results folder (--out of a sweep).")
    try:
        return load_studies(out_dir)
    except OSError as e:
        raise ResultsFileError(f"--compare {out_dir}: cannot read {path}: {e.strerror or e}.") from None


def relative(d: Difference, base: float) -> Difference:
    """A difference in % of the baseline's mean: what compares across bases whose perplexities differ in scale."""
    scale = 100.0 / base
    return dataclasses.replace(d, diff=d.diff * scale, half=None if d.half is None else d.half * scale)


def agreement(a: Difference | None, b: Difference | None, labels: Labels) -> str:
    """Whether two bases' effects of one value agree: in direction where both are significant; one-sided where one
    is; not comparable where a side has no difference or one seed (no test)."""
    if a is None or b is None or a.significant is None or b.significant is None:
        return NOT_COMPARABLE
    if a.significant and b.significant:
        return AGREE if (a.diff > 0) == (b.diff > 0) else DISAGREE
    if a.significant or b.significant:
        return f"{labels[0] if a.significant else labels[1]} only"
    return NEITHER


def _delta(st: Study, v: Value | None) -> Difference | None:
    """v's val ppl minus its study's baseline's, in % of the baseline (None: no such value, baseline or run)."""
    base = st.baseline
    if v is None or base is None or v is base:
        return None
    d = v.vs(base, METRIC)
    return d and relative(d, base.mean(METRIC))


def _cell(st: Study, v: Value | None) -> str | None:
    if v is not None and v is st.baseline:
        return "baseline"
    d = _delta(st, v)
    return None if d is None else diff_text(d, digits=2, unit="%")


def _find(st: Study, value: object) -> Value | None:
    return next((v for v in st.values if v.value == value), None)


def _delta_rows(a: Study, b: Study, labels: Labels) -> tuple[list[list[str | None]], list[str]]:
    """The Δ table's rows (every value of either side, the one-sided ones marked) and the values that disagree."""
    values = [v.value for v in a.values] + [v.value for v in b.values if _find(a, v.value) is None]
    rows, disagree = [], []
    for value in values:
        va, vb = _find(a, value), _find(b, value)
        label = (va or vb).label + ("" if va and vb else f" (only on {labels[0] if va else labels[1]})")
        both_base = va is not None and vb is not None and va is a.baseline and vb is b.baseline
        da, db = _delta(a, va), _delta(b, vb)
        word = None if both_base else agreement(da, db, labels)
        if word == DISAGREE:
            where = f"{da.diff:+.2f}% on {labels[0]}, {db.diff:+.2f}% on {labels[1]}"
            disagree.append(f"{a.named(va)} significantly in opposite directions ({where})")
        rows.append([label, _cell(a, va), _cell(b, vb), word])
    return rows, disagree


def _recommendations(a: Study, b: Study, labels: Labels) -> tuple[list[str], str | None]:
    """A line per base with recommend's evidence, and one saying whether they picked the same value; the second
    item names the difference when they did not."""
    ra, rb = recommend(a), recommend(b)
    lines = [f"- recommended on {lb}: {r.evidence if r else 'no finished run'}" for lb, r in zip(labels, (ra, rb))]
    if ra is None or rb is None:
        lines.append("- the same value? cannot tell: one side has no finished run")
        return lines, None
    if ra.value.value == rb.value.value:
        lines.append(f"- the same value on both: {a.named(ra.value)}")
        return lines, None
    which = f"{a.named(ra.value)} on {labels[0]}, {b.named(rb.value)} on {labels[1]}" + (
        " (provisional: one seed)" if ra.provisional or rb.provisional else ""
    )
    lines.append(f"- **different values**: {which}")
    return lines, f"recommended {which}"


def _same(ca: Check | None, cb: Check | None) -> str:
    """yes, **no**, or "no (1 seed)" where a side read only the direction: a difference it cannot test."""
    if ca is None or cb is None or Verdict.NOT_TESTABLE in (ca.verdict, cb.verdict):
        return NOT_COMPARABLE
    if ca.verdict is cb.verdict:
        return "yes"
    return "no (1 seed)" if ca.one_seed or cb.one_seed else DIFFERENT


def _verdicts(a: Study, b: Study, labels: Labels) -> tuple[str, list[str]]:
    """expected | verdict on each side | same verdict?, matched by the expectation's text; and the differing ones."""
    ca, cb = ({c.expected: c for c in expectations(st)} for st in (a, b))
    rows, differ = [], []
    for exp in list(ca) + [e for e in cb if e not in ca]:
        x, y = ca.get(exp), cb.get(exp)
        same = _same(x, y)
        if same == DIFFERENT:
            differ.append(f'"{exp}" ({x.text} vs {y.text})')
        rows.append([exp, x and f"**{x.text}**", y and f"**{y.text}**", same])
    return md_table(["expected", *(f"verdict on {lb}" for lb in labels), "same verdict?"], rows), differ


def rises(st: Study) -> list[tuple[Value, Value, float]]:
    """Where the base model's own val ppl rises with context by more than the flat band (expectations.FLAT): each
    step (shorter, longer, relative rise)."""
    vs = sorted((v for v in st.values if v.metric("base_val_ppl")), key=lambda v: float(v.value))
    steps = [(x, y, y.mean("base_val_ppl") / x.mean("base_val_ppl") - 1.0) for x, y in zip(vs, vs[1:])]
    return [s for s in steps if s[2] > FLAT]


def _base_context(a: Study, b: Study, labels: Labels) -> list[str]:
    """The base model's own val ppl per context on each side, and where it rises (it must not)."""
    values = sorted({v.value for st in (a, b) for v in st.values if v.metric("base_val_ppl")}, key=float)
    if not values:
        return []
    table = md_table(
        ["context", *(f"base val ppl on {lb}" for lb in labels)],
        [[str(x), *(num(v.mean("base_val_ppl")) if (v := _find(st, x)) else None for st in (a, b))] for x in values],
    )
    lines = []
    for lb, st in zip(labels, (a, b)):
        up = rises(st)
        where = ", ".join(f"{x.short} → {y.short} ({r:+.1%})" for x, y, r in up)
        flat = f"it does not rise (no step up by more than {FLAT:.1%})"
        lines.append(f"- on {lb}: " + (f"**it rises**: {where}" if up else flat))
    head = "The base model's own val ppl before fine-tuning; it must not rise with context (each token sees at least "
    return [head + "as much context):", "", table, "", *lines, ""]


def _title(st: Study) -> str:
    return st.ablation + (f" (study {st.study_hash[:8]})" if st.differs else "")


def _pairs(this: list[Study], other: list[Study]) -> list[tuple[Study, Study]]:
    """Studies of the same ablation and swept key, in this side's order (an ablation with several studies: in
    order on each side)."""
    this, other = ([s for s in side if not is_rung(s)] for side in (this, other))
    pairs, used = [], set()
    for s in this:
        t = next((t for t in other if (t.ablation, t.key) == (s.ablation, s.key) and id(t) not in used), None)
        if t is not None:
            used.add(id(t))
            pairs.append((s, t))
    return pairs


def compare_section(this: list[Study], other: list[Study], labels: Labels) -> str:
    """The markdown section `## A vs B`: per ablation in both, the recommendations, Δ vs baseline in % with its
    agreement, the expectations' verdicts, the base model's ppl against context; then where the two disagree."""
    a_name, b_name = labels
    pairs = _pairs(this, other)
    parts = [
        f"## {a_name} vs {b_name}",
        "",
        f"The same ablations on two bases, {a_name} and {b_name}. Their perplexities differ in scale, so each Δ is "
        "in % of its own study's baseline mean val ppl, with its 95% CI, tested on its own seeds (paired, or Welch "
        "where the seeds do not pair). "
        f"Agreement: *{AGREE}* = both significant, same direction; *{DISAGREE}* = both significant, opposite "
        f"directions; *<base> only* = significant on that base alone; *{NEITHER}*; *{NOT_COMPARABLE}* = missing on "
        "a side, or one seed (no test).",
        "",
    ]
    paired = {id(s) for p in pairs for s in p}
    alone = [
        f"{_title(s)} (only on {lb})"
        for lb, side in zip(labels, (this, other))
        for s in side
        if id(s) not in paired and not is_rung(s)
    ]
    if alone:
        parts += [f"Not compared: {', '.join(alone)}.", ""]
    if not pairs:
        return "\n".join([*parts, "No ablation is in both folders: nothing to compare.", ""])
    found: list[str] = []
    for a, b in pairs:
        rec_lines, rec_diff = _recommendations(a, b, labels)
        rows, disagree = _delta_rows(a, b, labels)
        verdict_table, verdicts = _verdicts(a, b, labels)
        parts += [f"### {_title(a)} (`{a.key}`)", "", *rec_lines, ""]
        if a.baseline and b.baseline and a.baseline.value != b.baseline.value:
            differ = f"{a.baseline.label} on {a_name}, {b.baseline.label} on {b_name}"
            parts += [f"The baselines differ ({differ}): each Δ is against its own.", ""]
        header = ["value", f"Δ val ppl vs baseline on {a_name}", f"Δ val ppl vs baseline on {b_name}", "agreement"]
        parts += [md_table(header, rows), "", verdict_table, ""]
        if a.key == CONTEXT:
            parts += _base_context(a, b, labels)
        found += [f"{a.ablation}: {v}" for v in disagree]
        found += [f"{a.ablation}: {rec_diff}"] if rec_diff else []
        found += [f"{a.ablation}: {v}" for v in verdicts]
    if found:
        parts.append(f"Where {a_name} and {b_name} disagree: " + "; ".join(found) + ".")
    else:
        parts.append(
            f"{a_name} and {b_name} agree everywhere the data can tell: no effect significant in opposite directions, "
            "the same recommended values and the same verdicts (rows marked one-sided, 1 seed or not comparable "
            "cannot tell)."
        )
    return "\n".join([*parts, ""])


def compare_folders(this_dir: Path, this: list[Study], other_dir: Path, labels: tuple[str | None, str | None]) -> str:
    """The section for `this_dir` (its studies already loaded) against `other_dir`; a None label is derived from
    the folder's base (base_label), with the folder's name added where both derive the same."""
    other = load_other(other_dir)
    a = labels[0] or base_label(this_dir, this)
    b = labels[1] or base_label(other_dir, other)
    if a == b and labels == (None, None):
        a, b = f"{a} ({Path(this_dir).resolve().name})", f"{b} ({Path(other_dir).resolve().name})"
    return compare_section(this, other, (a, b))
