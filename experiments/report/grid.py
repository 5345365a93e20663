"""The report of a grid study (several keys swept jointly, experiments.sweep.grid): a two-way table per key pair,
heatmaps of perplexity and of the paired Δ against the baseline cell, each key's main effect and their interaction
tested over seeds, the recommended combination (overall and under a budget), the Pareto front of the cells, and
what successive halving stopped.

Statistics are paired over seeds: every cell trains at the same seeds, and the same seed gives the same data order
and LoRA initialisation in every cell, so a contrast between cells is computed seed by seed and its mean gets a
t-interval over seeds (scipy). For a 2x2 sub-table with rows a0, a1 and columns b0, b1 the interaction contrast of
one seed is (y[a1,b1] - y[a1,b0]) - (y[a0,b1] - y[a0,b0]): how much the effect of b changes with a.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from experiments.report.checks import Check, Verdict
from experiments.report.fmt import EMPTY, MIB, ci, diff_text, integer, md_table, num
from experiments.report.recommend import METRIC, front, recommend
from experiments.report.stats import Difference, paired
from experiments.report.studies import LEVEL, Study, Value, run_config
from experiments.sweep.grid import SEP, is_grid, split_key, split_value
from experiments.sweep.halving import read_record, rung_name
from experiments.sweep.results import value_label

BUDGET_RATIO = 1.25  # Table 5's comparison: cells whose trainable parameters are within this factor of each other


# ----------------------------------------------------------------------------- budget


@dataclass(frozen=True)
class Budget:
    """Limits a recommended combination must keep: mean trainable parameters, train time (s), peak memory (MiB)."""

    max_trainable_params: int | None = None
    max_train_time_s: float | None = None
    max_memory_mib: float | None = None

    def __bool__(self) -> bool:
        return any(x is not None for x in dataclasses.astuple(self))

    def fits(self, v: Value) -> bool:
        """Within every limit set; a cell without the measurement a limit needs does not fit."""
        limits = (
            ("trainable_params", self.max_trainable_params, 1.0),
            ("train_time_s", self.max_train_time_s, 1.0),
            ("peak_memory_bytes", self.max_memory_mib, MIB),
        )
        for metric, limit, unit in limits:
            if limit is not None and ((m := v.mean(metric)) is None or m / unit > limit):
                return False
        return True

    @property
    def text(self) -> str:
        parts = []
        if self.max_trainable_params is not None:
            parts.append(f"≤ {self.max_trainable_params:,} trainable parameters")
        if self.max_train_time_s is not None:
            parts.append(f"≤ {num(self.max_train_time_s, 1)} s train time")
        if self.max_memory_mib is not None:
            parts.append(f"≤ {num(self.max_memory_mib, 1)} MiB peak memory")
        return ", ".join(parts)


def _positive(kind: type) -> Any:
    """An argparse type: a positive finite number; an int may be written as 5e4."""

    def parse(text: str) -> Any:
        try:
            x = float(text)
        except ValueError:
            x = math.nan
        if not (math.isfinite(x) and x > 0 and (kind is float or x.is_integer())):
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return kind(x)

    return parse


def add_budget_flags(ap: argparse.ArgumentParser) -> None:
    """--max-trainable-params, --max-train-time, --max-memory: the budget a recommended combination must keep."""
    ap.add_argument(
        "--max-trainable-params",
        type=_positive(int),
        metavar="N",
        help="also recommend the best combination of a grid with at most N trainable parameters (mean over seeds)",
    )
    ap.add_argument(
        "--max-train-time",
        type=_positive(float),
        metavar="S",
        help="... with a mean train time of at most S seconds (compare times measured under one concurrency)",
    )
    ap.add_argument(
        "--max-memory", type=_positive(float), metavar="MIB", help="... with a mean peak memory of at most MIB MiB"
    )


def budget_from_args(args: argparse.Namespace) -> Budget:
    return Budget(args.max_trainable_params, args.max_train_time, args.max_memory)


def within_budget(st: Study, budget: Budget) -> Study:
    """The study restricted to the cells that fit the budget (the same study when no limit is set)."""
    return dataclasses.replace(st, values=[v for v in st.values if budget.fits(v)]) if budget else st


# ----------------------------------------------------------------------------- the grid as a table of cells


@dataclass
class Grid:
    """A grid study's cells by their per-key values: `axes[i]` lists key i's values in table order."""

    study: Study
    keys: list[str]
    axes: list[list[Any]]
    cells: dict[tuple[Any, ...], Value]

    @property
    def baseline(self) -> tuple[Any, ...] | None:
        base = self.study.baseline
        return None if base is None else tuple(split_value(base.value))

    def cell(self, at: tuple[Any, ...]) -> Value | None:
        v = self.cells.get(at)
        return v if v is not None and v.metric(METRIC) else None

    def name(self, i: int, x: Any) -> str:
        """Key i's value x as prose names it: "rank 16", "q,v"."""
        return Study("", self.keys[i], "", []).named(Value(x, None, False))


def grid_of(st: Study, every: Sequence[str] = ()) -> Grid:
    """The cells of a grid study by key values; numeric keys in ascending order, the others in grid order.
    `every`: the labels of all the grid's cells in grid order, when some have no rows (halving stopped them)."""
    keys = split_key(st.key)
    cells = {tuple(split_value(v.value)): v for v in st.values}
    by_index = [tuple(split_value(c)) for c in every] or sorted(
        cells, key=lambda c: cells[c].index if cells[c].index is not None else math.inf
    )
    axes = []
    for i in range(len(keys)):
        xs = list(dict.fromkeys(c[i] for c in by_index))
        if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs):
            xs.sort()
        axes.append(xs)
    return Grid(st, keys, axes, cells)


def contrast(terms: list[tuple[float, Value]]) -> Difference | None:
    """sum(w * y) over the terms' cells, seed by seed (the seeds every cell finished), then its mean with a
    t-interval over seeds (scipy): a one-sample paired test against 0. None when no seed is shared."""
    per = [v.by_seed(METRIC) for _, v in terms]
    seeds = sorted(set.intersection(*(set(p) for p in per))) if per else []
    if not seeds:
        return None
    xs = [sum(w * p[s] for (w, _), p in zip(terms, per)) for s in seeds]
    return paired(xs, [0.0] * len(xs), LEVEL)


def _set(at: tuple[Any, ...], changes: dict[int, Any]) -> tuple[Any, ...]:
    """The cell `at` with key i set to changes[i] for each i in `changes`."""
    return tuple(changes.get(i, x) for i, x in enumerate(at))


def simple_effect(g: Grid, i: int, x0: Any, x1: Any, at: tuple[Any, ...]) -> Difference | None:
    """y(key i = x1) - y(key i = x0), the other keys as in `at`, paired over seeds."""
    a, b = g.cell(_set(at, {i: x1})), g.cell(_set(at, {i: x0}))
    return contrast([(1.0, a), (-1.0, b)]) if a is not None and b is not None else None


def main_effect(g: Grid, i: int, x0: Any, x1: Any) -> Difference | None:
    """y(key i = x1) - y(key i = x0) averaged over every combination of the other keys, paired over seeds; None
    unless every cell it needs has finished."""
    others = [range(len(ax)) if j != i else [0] for j, ax in enumerate(g.axes)]
    terms = []
    for idx in itertools.product(*others):
        base = tuple(g.axes[j][k] for j, k in enumerate(idx))
        a, b = g.cell(_set(base, {i: x1})), g.cell(_set(base, {i: x0}))
        if a is None or b is None:
            return None
        terms += [(1.0, a), (-1.0, b)]
    n = len(terms) // 2
    return contrast([(w / n, v) for w, v in terms])


def interaction(g: Grid, i: int, j: int, a0: Any, a1: Any, b0: Any, b1: Any, at: tuple[Any, ...]) -> Difference | None:
    """(y[a1,b1] - y[a1,b0]) - (y[a0,b1] - y[a0,b0]) for keys i (a) and j (b), the other keys as in `at`: how much
    the effect of key j changes between two values of key i, paired over seeds."""
    cells = [g.cell(_set(at, {i: a, j: b})) for a, b in ((a1, b1), (a1, b0), (a0, b1), (a0, b0))]
    if any(c is None for c in cells):
        return None
    return contrast(list(zip((1.0, -1.0, -1.0, 1.0), cells)))


# ----------------------------------------------------------------------------- report text

KEY_WORDS = {"lora.rank": "rank", "lora.target_modules": "modules", "model.max_position_embeddings": "context"}


def key_word(key: str) -> str:
    return KEY_WORDS.get(key, key)


def _d(d: Difference | None) -> str:
    return EMPTY if d is None else diff_text(d, digits=2, unit=" ppl")


def _cell_text(g: Grid, at: tuple[Any, ...], stopped: dict[str, int]) -> str:
    """val ppl ± CI, Δ vs the baseline cell, trainable params and train time; or why the cell has no number."""
    v = g.cells.get(at)
    label = SEP.join(str(value_label(x)) for x in at)
    if v is None or not v.metric(METRIC):
        return f"stopped at rung {stopped[label] + 1}" if label in stopped else EMPTY if v is None else "no ok run"
    base = g.cells.get(g.baseline) if g.baseline is not None else None
    delta = "baseline" if v is base else _d(v.vs(base, METRIC)) if base is not None and base.metric(METRIC) else None
    t = v.mean("train_time_s")
    cost = f"{integer(v.mean('trainable_params'))} params, {EMPTY if t is None else f'{t:.0f} s'}"
    delta = delta if delta in (None, "baseline") else f"Δ {delta}"
    return "<br>".join(x for x in (ci(v.summary(METRIC), 2), delta, cost) if x)


def pairs(g: Grid) -> list[tuple[int, int]]:
    return list(itertools.combinations(range(len(g.keys)), 2))


def two_way_table(g: Grid, i: int, j: int, stopped: dict[str, int] | None = None) -> str:
    """Rows: key i's values; columns: key j's; the other keys at the baseline cell's values."""
    at = g.baseline or tuple(ax[0] for ax in g.axes)
    header = [f"{key_word(g.keys[i])} \\ {key_word(g.keys[j])}"] + [g.name(j, b) for b in g.axes[j]]
    rows = [
        [g.name(i, a)] + [_cell_text(g, _set(at, {i: a, j: b}), stopped or {}) for b in g.axes[j]] for a in g.axes[i]
    ]
    return md_table(header, rows)


def main_effects_table(g: Grid) -> str:
    """Each key's value against the baseline's value of that key, averaged over every value of the other keys."""
    out = []
    base = g.baseline or tuple(ax[0] for ax in g.axes)
    for i, key in enumerate(g.keys):
        for x in g.axes[i]:
            if x != base[i]:
                out.append([key_word(key), f"{g.name(i, base[i])} → {g.name(i, x)}", _d(main_effect(g, i, base[i], x))])
    return md_table(["key", "change", "Δ val ppl, mean over the other keys' values (paired over seeds)"], out)


def interaction_table(g: Grid, i: int, j: int) -> str:
    """Every 2x2 sub-table that holds the baseline cell: the change of key j's effect when key i changes."""
    at = g.baseline or tuple(ax[0] for ax in g.axes)
    a0, b0 = at[i], at[j]
    out = [
        [
            f"{g.name(i, a0)} → {g.name(i, a1)}",
            f"{g.name(j, b0)} → {g.name(j, b1)}",
            _d(interaction(g, i, j, a0, a1, b0, b1, at)),
        ]
        for a1 in g.axes[i]
        if a1 != a0
        for b1 in g.axes[j]
        if b1 != b0
    ]
    header = [key_word(g.keys[i]), key_word(g.keys[j]), "interaction: (Δ of the second at a1) − (Δ at a0)"]
    return md_table(header, out)


def in_words(g: Grid, i: int, j: int) -> str:
    """Key i's effect from its first to its last value at each value of key j, said in words, with the interaction
    of the extreme 2x2 sub-table as the test of "depends"."""
    at = g.baseline or tuple(ax[0] for ax in g.axes)
    lo, hi = g.axes[i][0], g.axes[i][-1]
    word, where = key_word(g.keys[i]), key_word(g.keys[j])
    effects = [(b, simple_effect(g, i, lo, hi, _set(at, {j: b}))) for b in g.axes[j]]
    effects = [(b, d) for b, d in effects if d is not None]
    if not effects:
        return f"{g.name(i, lo)} → {g.name(i, hi)}: no {where} value has both cells finished."
    each = "; ".join(f"with {g.name(j, b)}: {_d(d)}" for b, d in effects)
    matters = [g.name(j, b) for b, d in effects if d.significant]
    flat = [g.name(j, b) for b, d in effects if d.significant is False]
    verb = "matter" if word.endswith("s") else "matters"
    if matters and flat:
        gist = f"{word} {verb} with {', '.join(matters)} but not with {', '.join(flat)}"
    elif matters:
        gist = f"{word} {verb} with every {where} value tested"
    elif flat:
        gist = f"{word}: within noise with every {where} value tested"
    else:
        gist = f"{word}'s effect, one seed per cell (direction only)"
    text = f"{gist} (Δ {g.name(i, lo)} → {g.name(i, hi)} {each})"
    (b0, _), (b1, _) = effects[0], effects[-1]
    d = interaction(g, i, j, lo, hi, b0, b1, at) if b0 != b1 else None
    if d is not None:
        tested = "one seed: not tested" if d.significant is None else "significant" if d.significant else "within noise"
        text += (
            f"; the interaction (the {word} effect with {g.name(j, b1)} minus with {g.name(j, b0)}) is "
            f"{d.diff:+.2f}{'' if d.half is None else f' ± {d.half:.2f}'} ppl, {tested}"
        )
    return text + "."


# ----------------------------------------------------------------------------- the literature's interaction findings


def _width(g: Grid, m: int, x: Any, done: dict[tuple[Any, ...], Value]) -> float | None:
    """How much a module set adapts, whatever its names (q_proj, attention, all-linear): its cells' mean trainable
    parameters per unit of rank (the parameters of one rank-1 adapter on every matrix it covers)."""
    per = [v.mean("trainable_params") / float(c[g.keys.index("lora.rank")]) for c, v in done.items() if c[m] == x]
    return sum(per) / len(per) if per else None


def literature_checks(g: Grid) -> list[Check]:
    """LoRA Table 5, QLoRA and Biderman et al. 2024 on rank x target modules, judged on this grid (both keys
    needed; any other key at the baseline cell's value)."""
    if not {"lora.rank", "lora.target_modules"} <= set(g.keys):
        return []
    r, m = g.keys.index("lora.rank"), g.keys.index("lora.target_modules")
    at = g.baseline or tuple(ax[0] for ax in g.axes)
    done = {
        c: v
        for c, v in g.cells.items()
        if g.cell(c) is not None
        and v.mean("trainable_params")
        and all(c[k] == at[k] for k in range(len(at)) if k not in (r, m))
    }
    widths = {x: w for x in g.axes[m] if (w := _width(g, m, x, done)) is not None}
    if len(widths) < 2 or len(g.axes[r]) < 2:
        exp = "Rank and target modules interact as the literature reports (LoRA Table 5, QLoRA, Biderman et al. 2024)"
        return [Check(exp, "fewer than two module sets or ranks finished", Verdict.NOT_TESTABLE)]
    return [_table5(g, r, m, done, widths), _qlora(g, r, m, at, widths), _biderman(g, r, m, done, widths)]


def _verdict(ds: list[Difference]) -> tuple[Verdict, bool]:
    """One verdict over comparisons that each should come out negative (lower ppl), and whether it rests on one
    seed (direction only)."""
    if any(d.significant is None for d in ds):
        if all(d.diff < 0 for d in ds):
            return Verdict.HELD, True
        return (Verdict.NOT_HELD if all(d.diff >= 0 for d in ds) else Verdict.PARTLY_HELD), True
    good = [d for d in ds if d.diff < 0 and d.significant]
    bad = [d for d in ds if d.diff > 0 and d.significant]
    if good and bad:
        return Verdict.PARTLY_HELD, False
    if bad:  # a significant effect the other way is never hidden behind "within noise"
        return Verdict.NOT_HELD, False
    if good:
        return (Verdict.HELD if len(good) == len(ds) else Verdict.PARTLY_HELD), False
    return (Verdict.WITHIN_NOISE if all(d.diff < 0 for d in ds) else Verdict.NOT_HELD_WITHIN_NOISE), False


def _check(exp: str, obs: str, ds: list[Difference]) -> Check:
    verdict, one_seed = _verdict(ds)
    return Check(exp, obs, verdict, one_seed=one_seed)


def _table5(g: Grid, r: int, m: int, done: dict[tuple[Any, ...], Value], widths: dict[Any, float]) -> Check:
    exp = (
        "At a similar parameter budget, more matrix types at a lower rank beat fewer types at a higher rank "
        "(LoRA, Hu et al. 2021, Table 5)"
    )
    found = []
    for (c1, v1), (c2, v2) in itertools.permutations(done.items(), 2):
        p1, p2 = v1.mean("trainable_params"), v2.mean("trainable_params")
        wider = widths.get(c1[m], 0.0) > widths.get(c2[m], math.inf) and c1[r] < c2[r]
        if wider and max(p1, p2) / min(p1, p2) <= BUDGET_RATIO:
            found.append((c1, c2, v1.vs(v2, METRIC)))
    if not found:
        obs = f"no two cells within ×{BUDGET_RATIO} of each other's trainable parameters trade modules for rank"
        return Check(exp, obs, Verdict.NOT_TESTABLE)
    obs = "; ".join(
        f"{g.name(m, c1[m])} at {g.name(r, c1[r])} vs {g.name(m, c2[m])} at {g.name(r, c2[r])} "
        f"({integer(done[c1].mean('trainable_params'))} vs {integer(done[c2].mean('trainable_params'))} params): "
        f"{_d(d)}"
        for c1, c2, d in found
    )
    return _check(exp, obs, [d for _, _, d in found])


def _qlora(g: Grid, r: int, m: int, at: tuple[Any, ...], widths: dict[Any, float]) -> Check:
    exp = "With LoRA on the most modules the rank matters little (QLoRA, Dettmers et al. 2023: all linear layers)"
    widest, narrow = max(widths, key=widths.get), min(widths, key=widths.get)
    lo, hi = g.axes[r][0], g.axes[r][-1]
    d = simple_effect(g, r, lo, hi, _set(at, {m: widest}))
    if d is None:
        return Check(
            exp, f"with {g.name(m, widest)} the lowest and highest rank have not both finished", Verdict.NOT_TESTABLE
        )
    dn = simple_effect(g, r, lo, hi, _set(at, {m: narrow}))
    obs = f"{g.name(r, lo)} → {g.name(r, hi)} with {g.name(m, widest)}: {_d(d)}" + (
        f" (with {g.name(m, narrow)}: {_d(dn)})" if dn is not None else ""
    )
    if d.significant is None:
        return Check(exp, obs, Verdict.NOT_TESTABLE, one_seed=True)
    return Check(exp, obs, Verdict.NOT_HELD if d.significant else Verdict.HELD)


def _biderman(g: Grid, r: int, m: int, done: dict[tuple[Any, ...], Value], widths: dict[Any, float]) -> Check:
    exp = "LoRA on all modules at a higher rank gives the lowest perplexity (Biderman et al. 2024)"
    widest = max(widths, key=widths.get)
    inside = {c: v for c, v in done.items() if c[m] == widest and c[r] != g.axes[r][0]}
    outside = {c: v for c, v in done.items() if c not in inside}
    if not inside or not outside:
        return Check(
            exp,
            "no finished cell on one side (the most modules above the lowest rank, or the rest)",
            Verdict.NOT_TESTABLE,
        )
    best_in = min(inside, key=lambda c: inside[c].mean(METRIC))
    best_out = min(outside, key=lambda c: outside[c].mean(METRIC))
    d = inside[best_in].vs(outside[best_out], METRIC)
    obs = (
        f"best with {g.name(m, widest)} above the lowest rank: {g.name(r, best_in[r])}; best other cell: "
        f"{g.name(r, best_out[r])} with {g.name(m, best_out[m])}; difference {_d(d)}"
    )
    return _check(exp, obs, [d])


# ----------------------------------------------------------------------------- halving, choice, the whole section


def stopped_cells(st: Study, out_dir: Path | None) -> tuple[dict[str, int], list[dict]]:
    """Cell label -> the rung (0-based) halving stopped it at, and the study's rungs as recorded; empty without
    halving (experiments.sweep.halving writes the record as it decides)."""
    rungs = read_record(out_dir).get(f"{st.ablation}/{st.study_hash}", {}).get("rungs", []) if out_dir else []
    stopped: dict[str, int] = {}
    for k, rung in enumerate(rungs):
        for c in rung["cells"]:
            if c not in rung["kept"]:
                stopped.setdefault(c, k)
    return stopped, rungs


def halving_text(st: Study, studies: list[Study], out_dir: Path | None) -> list[str]:
    """What successive halving trained, stopped and saved, and whether its pick matches the full grid's."""
    stopped, rungs = stopped_cells(st, out_dir)
    if not rungs:
        return []
    g = grid_of(st)
    lines = ["### Successive halving", ""]
    rows = []
    for k, rung in enumerate(rungs):
        loss = rung.get("tune_loss", {})
        rows.append(
            [
                str(k + 1),
                f"{rung['tokens']:,}",
                ", ".join(f"{_cell_name(g, c)} ({num(loss.get(c), 4)})" for c in rung["cells"]),
                ", ".join(_cell_name(g, c) for c in rung["kept"]),
            ]
        )
    lines += [md_table(["rung", "tokens per run", "cells (tune loss)", "kept"], rows), ""]
    trained = [
        r
        for s in studies
        if s.ablation in {rung_name(st.ablation, k) for k in range(len(rungs))} | {st.ablation}
        and (s.ablation != st.ablation or s.study_hash == st.study_hash)
        for r in s.rows
        if r.get("train_tokens")
    ]
    kept_last = set(rungs[-1]["kept"])
    full = sum(r["train_tokens"] for r in st.rows if r.get("train_tokens")) / max(1, len(st.rows))
    n_cells, seeds = len(rungs[0]["cells"]), max((len(v.rows) for v in st.values), default=0)
    spent = sum(r["train_tokens"] for r in trained if r["ablation"] != st.ablation or str(r["value"]) in kept_last)
    lines.append(
        f"Cells were kept by their mean loss on the tune split (documents held out from training and validation), "
        f"never by the validation numbers the tables show. Halving trained {spent:,.0f} tokens where the full grid "
        f"takes {n_cells * seeds * full:,.0f} ({spent / (n_cells * seeds * full):.0%}). A stopped cell is one that "
        "was behind at a fraction of the budget: a late bloomer (a cell that learns slowly but ends best) can be "
        "stopped this way."
    )
    lines.append("")
    finished = [v for v in st.values if v.metric(METRIC)]
    if len(finished) == n_cells:  # the full grid ran too (same configs as the last rung): compare the picks
        full_pick = recommend(st)
        halved = dataclasses.replace(st, values=[v for v in st.values if str(v.value) in kept_last])
        pick = recommend(halved)
        same = pick is not None and full_pick is not None and pick.value is full_pick.value
        lines.append(
            f"The full grid ran as well: its recommended cell is {st.named(full_pick.value)}; halving's is "
            f"{st.named(pick.value)} ({'the same' if same else 'a different one'})."
        )
    else:
        lines.append(
            "To check halving's pick, run the grid in full in this folder (without --halving, with --set "
            f"data.tune_fraction={tune_fraction(st, out_dir)}: the same configs, so the kept cells are reused)."
        )
    return lines + [""]


def tune_fraction(st: Study, out_dir: Path | None) -> Any:
    """The tune split the study's runs held out (their config's data.tune_fraction): a full grid that reuses
    halving's runs must hold out the same."""
    cfg = run_config(out_dir, st.rows[0]) if out_dir and st.rows else {}
    return cfg.get("data", {}).get("tune_fraction", "<ablation.tune_fraction>")


def _cell_name(g: Grid, label: str) -> str:
    return SEP.join(g.name(i, x) for i, x in enumerate(split_value(label)))


def choice_text(st: Study, budget: Budget | None) -> list[str]:
    """The Pareto front of the cells against trainable parameters and against train time, and the recommended
    cell under the budget (the recommended cell overall is in the Answers)."""
    lines = []
    for cost, word in (("trainable_params", "trainable parameters"), ("train_time_s", "train time")):
        line = front(st, cost)
        if line:
            pts = ", ".join(
                f"{st.named(v)} ({num(v.mean(METRIC), 2)} ppl, "
                + (integer(v.mean(cost)) if cost == "trainable_params" else f"{v.mean(cost):.0f} s")
                + ")"
                for v in line
            )
            lines.append(f"- Pareto front against {word} (no other cell has both less {word} and lower ppl): {pts}")
    if budget:
        allowed = within_budget(st, budget)
        rec = recommend(allowed)
        lines.append(
            f"- **Under the budget** ({budget.text}): "
            + (rec.evidence if rec else f"no cell fits ({len(st.values)} cells, none within every limit)")
        )
    return lines + ([""] if lines else [])


def _image(plots: dict[str, Path], name: str, alt: str, out_dir: Path | None) -> list[str]:
    if name not in plots:
        return []
    rel = plots[name].relative_to(out_dir) if out_dir else plots[name]
    return [f"![{alt}]({rel.as_posix()})", ""]


def is_rung(st: Study) -> bool:
    """A study of an earlier halving rung ("<name>.rung<k>"): reported inside its grid's section."""
    return is_grid(st.key) and ".rung" in st.ablation and st.ablation.rsplit(".rung", 1)[1].isdigit()


def grid_section(
    st: Study,
    studies: list[Study],
    plots: dict[str, Path] | None = None,
    out_dir: Path | None = None,
    budget: Budget | None = None,
) -> list[str]:
    """The report's lines for a grid study (none for any other): two-way tables, heatmaps, main effects,
    interactions in numbers and words, the Pareto front, the choice under a budget, halving, the literature."""
    if not is_grid(st.key):
        return []
    stopped, rungs = stopped_cells(st, out_dir)
    g = grid_of(st, rungs[0]["cells"] if rungs else ())
    plots = plots or {}
    lines = [
        "### Two-way tables",
        "",
        f"Each cell: val ppl ± {LEVEL:.0%} CI over seeds; Δ against the baseline cell "
        f"({st.named(st.baseline) if st.baseline else EMPTY}), paired over seeds; trainable parameters and train "
        "time." + (" Keys not in a table stay at the baseline cell's values." if len(g.keys) > 2 else ""),
        "",
    ]
    for i, j in pairs(g):
        lines += [two_way_table(g, i, j, stopped), ""]
        suffix = f"_{i}{j}" if len(g.keys) > 2 else ""
        lines += _image(plots, f"{st.slug}_grid{suffix}", f"{st.ablation}: val ppl and Δ vs baseline", out_dir)
    lines += ["### Main effects and interaction", "", main_effects_table(g), ""]
    for i, j in pairs(g):
        lines += [interaction_table(g, i, j), ""]
        lines += [f"- {in_words(g, i, j)}", f"- {in_words(g, j, i)}", ""]
    lines += choice_text(st, budget)
    lines += halving_text(st, studies, out_dir)
    checks = literature_checks(g)
    if checks:
        lines += [
            "### Expected vs observed: interactions in the literature",
            "",
            md_table(["expected", "observed", "verdict"], [[c.expected, c.observed, f"**{c.text}**"] for c in checks]),
            "",
        ]
    return lines


# ----------------------------------------------------------------------------- heatmaps


def plot_grids(studies: list[Study], folder: Path) -> dict[str, Path]:
    """Per grid study and key pair: a heatmap of val ppl and one of the paired Δ against the baseline cell
    (annotated with its CI; a bold number is significant). {plot name: path}, as experiments.report.plots gives."""
    out = {}
    for st in studies:
        if not is_grid(st.key) or is_rung(st):
            continue
        g = grid_of(st)
        for i, j in pairs(g):
            suffix = f"_{i}{j}" if len(g.keys) > 2 else ""
            out[f"{st.slug}_grid{suffix}"] = _heatmaps(g, i, j, Path(folder) / f"{st.slug}_grid{suffix}.png")
    return out


def _heatmaps(g: Grid, i: int, j: int, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    at = g.baseline or tuple(ax[0] for ax in g.axes)
    base = g.cell(at)
    ppl = np.full((len(g.axes[i]), len(g.axes[j])), np.nan)
    delta = np.full_like(ppl, np.nan)
    notes: dict[tuple[int, int], tuple[str, str, bool]] = {}
    for (r, a), (c, b) in itertools.product(enumerate(g.axes[i]), enumerate(g.axes[j])):
        v = g.cell(_set(at, {i: a, j: b}))
        if v is None:
            continue
        ppl[r, c] = v.mean(METRIC)
        d = v.vs(base, METRIC) if base is not None and v is not base else None
        if v is base:
            delta[r, c] = 0.0
        elif d is not None:
            delta[r, c] = d.diff
        half = "" if d is None or d.half is None else f"\n± {d.half:.2f}"
        notes[r, c] = (
            f"{ppl[r, c]:.2f}",
            "baseline" if v is base else f"{delta[r, c]:+.2f}{half}",
            bool(d and d.significant),
        )
    fig, axes = plt.subplots(1, 2, figsize=(5 + 2.2 * len(g.axes[j]), 1.5 + 1.1 * len(g.axes[i])))
    lim = np.nanmax(np.abs(delta)) if np.isfinite(delta).any() else 1.0
    panels = (
        (ppl, "viridis_r", None, None, "val ppl (mean over seeds)", 0),
        (delta, "RdBu_r", -lim or -1.0, lim or 1.0, "Δ val ppl vs baseline cell (paired; bold: significant)", 1),
    )
    for ax, (data, cmap, lo, hi, title, k) in zip(axes, panels):
        im = ax.imshow(data, cmap=cmap, vmin=lo, vmax=hi, aspect="auto")
        fig.colorbar(im, ax=ax, shrink=0.8)
        ax.set_xticks(range(len(g.axes[j])), [g.name(j, b) for b in g.axes[j]], rotation=15, ha="right")
        ax.set_yticks(range(len(g.axes[i])), [g.name(i, a) for a in g.axes[i]])
        ax.set_xlabel(key_word(g.keys[j]))
        ax.set_ylabel(key_word(g.keys[i]))
        ax.set_title(title, fontsize=9)
        for (r, c), note in notes.items():
            red, green, blue, _ = im.cmap(im.norm(data[r, c]))
            dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5  # white text where the colour is dark
            weight = "bold" if k and note[2] else None
            ax.text(
                c,
                r,
                note[k],
                ha="center",
                va="center",
                fontsize=8,
                fontweight=weight,
                color="white" if dark else "black",
            )
    fig.suptitle(f"{g.study.ablation}: {key_word(g.keys[i])} × {key_word(g.keys[j])}", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
