"""A results folder read as studies: the latest row per run, grouped by ablation and shared config (one table
each), and per swept value its runs over seeds with their summaries."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from experiments.config.schema import flatten
from experiments.report.fmt import MIB
from experiments.report.stats import Difference, Summary, compare, mean_ci
from experiments.sweep.grid import SEP, is_grid, split_key
from experiments.sweep.results import RESULTS_JSONL, ResultsFileError, latest, numbered_rows

LEVEL = 0.95
SHORT = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "out_proj": "o"}
NOUN = {"lora.rank": "rank", "model.max_position_embeddings": "context"}  # how prose names a value of these keys


@dataclass
class Value:
    """One swept value of a study: its runs (one per seed, latest row each) and their summaries."""

    value: Any
    index: int | None
    is_baseline: bool
    rows: list[dict] = field(default_factory=list)  # in an lr grid: the runs at the chosen learning rate
    grid: dict[float, list[dict]] = field(default_factory=dict)  # lr -> runs, when the study has an lr grid
    chosen_lr: float | None = None

    def tune_loss(self, lr: float) -> float | None:
        """Mean tune-split loss over the finished seeds at `lr`: what the learning rate is chosen by."""
        xs = [
            float(r["tune_loss"])
            for r in self.grid.get(lr, [])
            if r["status"] == "ok" and r.get("tune_loss") is not None
        ]
        return sum(xs) / len(xs) if xs else None

    @property
    def all_rows(self) -> list[dict]:
        """Every run of this value: at every learning rate of a grid, else just `rows`."""
        return [r for runs in self.grid.values() for r in runs] if self.grid else self.rows

    def choose_lr(self) -> None:
        """Keep the runs at the lr with the lowest mean tune loss (never the validation split, which is reported).
        No lr scored means no finished run (load_studies refuses a finished grid run without a tune loss): keep every
        run, so the table shows them all as not ok."""
        scored = {lr: loss for lr in self.grid if (loss := self.tune_loss(lr)) is not None}
        self.chosen_lr = min(scored, key=scored.get) if scored else None
        self.rows = self.grid[self.chosen_lr] if scored else self.all_rows

    @property
    def ok(self) -> list[dict]:
        return [r for r in self.rows if r["status"] == "ok"]

    def metric(self, name: str) -> list[float]:
        return [float(r[name]) for r in self.ok if r.get(name) is not None]

    def by_seed(self, name: str) -> dict[int, float]:
        """seed -> that metric, over the finished runs that have it: what a paired comparison pairs on."""
        return {r["seed"]: float(r[name]) for r in self.ok if r.get(name) is not None}

    def vs(self, other: Value, name: str) -> Difference | None:
        """This value's metric minus `other`'s: paired over seeds where they pair, Welch where not."""
        a, b = self.by_seed(name), other.by_seed(name)
        return compare(a, b, LEVEL) if a and b else None

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
        """Short label for plots and prose: "q,v,fc1,fc2" for module lists; "16 × q,v" for a grid's cell."""
        if isinstance(self.value, str) and SEP in self.value:
            return SEP.join(Value(p, None, False).short for p in self.value.split(SEP))
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
        return [r for v in self.values for r in v.all_rows]

    @property
    def slug(self) -> str:
        """File-name stem of this study's plot: the ablation, plus the study hash when it has several studies."""
        return self.ablation + (f"_{self.study_hash[:8]}" if self.differs else "")

    @property
    def lr_grid(self) -> list[float]:
        """The learning rates every value trained at ([] without a grid)."""
        return sorted({lr for v in self.values for lr in v.grid})

    def lr_at_edge(self) -> list[Value]:
        """Values whose chosen lr is the grid's smallest or largest: the best lr may lie outside the grid."""
        grid = self.lr_grid
        return [v for v in self.values if grid and v.chosen_lr in (grid[0], grid[-1])]

    @property
    def numeric(self) -> bool:
        return all(isinstance(v.value, (int, float)) and not isinstance(v.value, bool) for v in self.values)

    def named(self, v: Value) -> str:
        """A value as prose names it: "rank 8", "context 1024", "q,v,fc1,fc2"; a grid's cell "rank 8 × q,v"."""
        if is_grid(self.key):
            parts = zip(split_key(self.key), str(v.value).split(SEP))
            return SEP.join(Study("", k, "", []).named(Value(p, None, False)) for k, p in parts)
        return f"{NOUN[self.key]} {v.short}" if self.key in NOUN else v.short

    @property
    def source_note(self) -> str | None:
        """Why this study's source-set (forgetting) columns are empty; None when a finished run measured one."""
        ok = [r for r in self.rows if r["status"] == "ok"]
        if any(r.get("source_val_ppl") is not None for r in ok):
            return None
        if not ok:
            return "no finished run"
        if all("source_val_ppl" not in r for r in ok):
            return (
                "these rows were written before runs measured a source set (they have no source columns); "
                "rerun the study to measure forgetting"
            )
        return (
            "no source set: the base is a user's checkpoint and the config has no `eval.source_data` "
            "(set it to the base's own kind of text, as --data accepts, to measure forgetting)"
        )


def summary_rows(st: Study, recommended: Value | None = None) -> list[dict[str, Any]]:
    """One dict of numbers per value, in the study's order, for a pandas DataFrame: means over the finished seeds
    with their 95% CI half-widths (None with one seed), and val ppl minus the baseline's with its test ("paired"
    over seeds, "Welch" where they do not pair; None with one seed). Memory is in MiB. `recommended` is the value
    experiments.report.recommend picked: that module builds on this one, so the caller passes it in."""
    base = st.baseline
    out = []
    for v in st.values:
        d = v.vs(base, "val_ppl") if base is not None and v is not base else None
        out.append(
            {
                "value": v.value,
                "baseline": v.is_baseline,
                "recommended": v is recommended,
                "seeds_ok": len(v.ok),
                "seeds": len(v.rows),
                "chosen_lr": v.chosen_lr,  # in an lr grid: the lr these numbers are at (None without a grid)
                **_mean_half(v, "val_ppl"),
                "delta_val_ppl": d and d.diff,
                "delta_val_ppl_ci": d and d.half,
                "delta_p": d and d.p,
                "delta_significant": d and d.significant,
                "delta_test": d and d.test,
                **_mean_half(v, "train_time_s"),
                "tokens_per_s": v.mean("tokens_per_s"),
                "peak_memory_mib": _scaled(v.mean("peak_memory_bytes"), MIB),
                "saved_for_backward_mib": _scaled(v.mean("saved_for_backward_bytes"), MIB),
                "trainable_params": v.mean("trainable_params"),
                **_mean_half(v, "source_val_ppl"),
                "forgetting": v.mean("forgetting"),
            }
        )
    return out


def _mean_half(v: Value, name: str) -> dict[str, float | None]:
    """{name: mean, name_ci: 95% CI half-width} over a value's finished seeds (None where there is nothing)."""
    s = v.summary(name)
    return {name: s and s.mean, f"{name}_ci": s and s.half}


def _scaled(x: float | None, unit: float) -> float | None:
    return None if x is None else x / unit


def run_config(out_dir: Path, row: dict) -> dict:
    """The config a row's run was trained with (its run folder's config.json), {} if it is gone."""
    try:
        return json.loads((out_dir / row["run_dir"] / "config.json").read_text(encoding="utf-8"))
    except (OSError, KeyError, TypeError, json.JSONDecodeError):
        return {}


class Need(NamedTuple):
    """What a feature of the report needs of a study's rows. A row of an older version, or edited by hand, may lack
    it: the row is named (ResultsFileError: file, line, key), never dropped or pooled with others silently."""

    keys: tuple[str, ...]
    finished_only: bool  # needed of the rows that finished ok; else of every row of the study
    why: str  # "...lacks `lr`, which <why>"
    fix: str


NEEDS = {
    "table": Need(
        ("val_ppl",),
        True,
        "the table's mean over seeds and the recommendation compare values by",
        "delete those lines and run the same sweep again to retrain those runs",
    ),
    "lr grid": Need(
        ("lr",),
        False,
        "tells apart the runs of one value at one seed (an lr grid); without it they would be pooled into one mean",
        "add each run's train.lr (its runs/<config_hash>/config.json has it) to its row, or delete those lines and "
        "run the same sweep again",
    ),
    "lr choice": Need(
        ("tune_loss",),
        True,
        "an lr grid chooses each value's learning rate by (the loss on the tune split; validation plays no part)",
        "delete those lines and run the same sweep again to retrain and measure those runs",
    ),
}
# Reported without, and said: the source set's columns (source_val_ppl, ...; Study.source_note) and the costs the
# recommendation ranks by (recommend.COSTS; Study.notes).


def load_studies(out_dir: Path) -> list[Study]:
    """The latest row per (ablation, config hash), grouped into studies, in the order they first appear. A row that
    lacks what its study needs (NEEDS) raises ResultsFileError naming it."""
    out_dir = Path(out_dir)
    numbered = numbered_rows(out_dir)
    line = {id(r): n for n, r in numbered}
    rows = list(latest(r for _, r in numbered).values())
    studies: dict[tuple[str, str], Study] = {}
    for r in rows:
        st = studies.setdefault((r["ablation"], r["study_hash"]), Study(r["ablation"], r["key"], r["study_hash"], []))
        v = next((v for v in st.values if v.value == r["value"]), None)
        if v is None:
            v = Value(r["value"], r.get("value_index"), bool(r.get("is_baseline")))
            st.values.append(v)
        v.rows.append(r)
    path = out_dir / RESULTS_JSONL
    for st in studies.values():
        for v in st.values:
            v.rows.sort(key=lambda r: r["seed"])
            _require(path, line, v.rows, NEEDS["table"])
            # Several runs of this value at one seed, or at several learning rates: an lr grid. Each value is then
            # reported at its chosen lr, so every run must say its lr and the finished ones their tune loss.
            if len({r.get("lr") for r in v.rows}) > 1 or len({r["seed"] for r in v.rows}) < len(v.rows):
                _require(path, line, v.rows, NEEDS["lr grid"])
                for r in v.rows:
                    v.grid.setdefault(r["lr"], []).append(r)
                for lr, runs in v.grid.items():
                    _distinct_seeds(path, line, st, v, lr, runs)
                _require(path, line, v.rows, NEEDS["lr choice"])
                v.choose_lr()
        if st.numeric:
            st.values.sort(key=lambda v: v.value)
        else:
            st.values.sort(key=lambda v: (v.index is None, v.index if v.index is not None else 0, v.label))
    _mark_differences(out_dir, list(studies.values()))
    return list(studies.values())


def _lines(ns: list[int]) -> str:
    """ "line 4", "lines 4, 9, 12" (the first six, then how many more)."""
    ns = sorted(ns)
    if len(ns) == 1:
        return f"line {ns[0]}"
    shown = ", ".join(map(str, ns[:6])) + (f" and {len(ns) - 6} more" if len(ns) > 6 else "")
    return f"lines {shown}"


def _require(path: Path, line: dict[int, int], rows: list[dict], need: Need) -> None:
    """ResultsFileError naming the first key of `need` that some of `rows` lack (or hold empty), and their lines."""
    for key in need.keys:
        lacking = [line[id(r)] for r in rows if r.get(key) is None and (r["status"] == "ok" or not need.finished_only)]
        if lacking:
            raise ResultsFileError(
                f"{path}, {_lines(lacking)} lack{'s' if len(lacking) == 1 else ''} `{key}` (absent or empty), which "
                f"{need.why} "
                f"(rows of ablation {rows[0]['ablation']!r}, written by an older version or edited by hand). "
                f"Nothing was written: {need.fix}."
            )


def _distinct_seeds(path: Path, line: dict[int, int], st: Study, v: Value, lr: Any, runs: list[dict]) -> None:
    """Two latest rows of one value, seed and lr in one study are runs their rows do not tell apart: refuse to pool."""
    by_seed: dict[int, list[int]] = {}
    for r in runs:
        by_seed.setdefault(r["seed"], []).append(line[id(r)])
    twins = next((ns for ns in by_seed.values() if len(ns) > 1), None)
    if twins:
        raise ResultsFileError(
            f"{path}, {_lines(twins)} are runs of {st.ablation} value {v.label} at one seed and lr {lr} with "
            "different config hashes, which no column of their rows tells apart; they would be pooled into one mean. "
            "Nothing was written: delete the lines that do not belong to this study."
        )


def _mark_differences(out_dir: Path, studies: list[Study]) -> None:
    """An ablation run under two different configs gets two tables; say what differs between them."""
    by_name: dict[str, list[Study]] = {}
    for st in studies:
        by_name.setdefault(st.ablation, []).append(st)
    for group in by_name.values():
        if len(group) < 2:
            continue
        flats = [flatten(run_config(out_dir, st.rows[0])) for st in group]
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
