"""Successive halving over a grid's cells (`--halving`, `ablation.halving: true`): a grid multiplies runs, so train
every cell on a fraction of the token budget, keep the better half by the loss on the tune split (never the
validation split, which the report shows), train those on twice the tokens, and so on up to the full budget.

With RUNGS = 3 and ETA = 2 a grid of n cells trains n cells on 1/4 of the tokens, ceil(n/2) on 1/2 and ceil(n/4) on
all of them: 9 cells cost 2.25 + 2.5 + 3 = 7.75 full runs instead of 9. Each rung is an ordinary sweep (resume, locks,
executors), its runs fresh short runs with their own learning-rate schedule; the last rung's runs are exactly the
full grid's runs of the kept cells, so a full grid run later in the same folder reuses them. The price: a cell that
learns slowly but ends best (a late bloomer) can be dropped at an early rung; the report says so.

Rows of an earlier rung k go to the ablation "<name>.rung<k>"; the last rung's rows to the study itself. Every
decision (which cells a rung kept) is written to RUN_DIR/halving.json as soon as it is made, and a later run of the
same command takes it from there, so a sweep killed in the middle of a rung resumes that rung with the same cells
and runs nothing twice. `--dry-run` lists the runs of rung 1 and of each later rung already decided, and says what
the undecided rungs will train (`halving_plan`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from data.cache import write_json_atomic
from experiments.config.config import with_values
from experiments.sweep.executors import Executor, Runner
from experiments.sweep.plan import RunSpec, plan_states, study_hash
from experiments.sweep.results import latest, read_rows
from experiments.sweep.sweep import run_sweep

HALVING_FILE = "halving.json"
RUNGS = 3  # budgets 1/4, 1/2, 1 of train.tokens
ETA = 2  # each rung keeps ceil(1/ETA) of its cells and trains them on ETA times the tokens


def rung_name(ablation: str, rung: int) -> str:
    """The ablation name of an earlier rung's rows (the last rung's rows keep the study's own name)."""
    return f"{ablation}.rung{rung}"


def rung_tokens(tokens: int, batch_tokens: int, rungs: int = RUNGS, eta: int = ETA) -> list[int]:
    """Each rung's token budget: tokens / eta^(rungs-1-k), in whole optimizer steps, at least one; the last is
    `tokens` itself."""
    steps = [round(tokens / eta ** (rungs - 1 - k) / batch_tokens) for k in range(rungs - 1)]
    return [max(1, n) * batch_tokens for n in steps] + [tokens]


def kept(n: int, eta: int = ETA) -> int:
    return max(1, math.ceil(n / eta))


def _at_budget(spec: RunSpec, rung: int, last: bool, tokens: int) -> RunSpec:
    """The spec trained on `tokens` under the rung's ablation name (the last rung: the spec itself)."""
    if last:
        return spec
    cfg = with_values(spec.cfg, [("train.tokens", tokens, "--halving")])
    return dataclasses.replace(
        spec,
        ablation=rung_name(spec.ablation, rung),
        cfg=cfg,
        config_hash=cfg.hash(),
        study_hash=study_hash(cfg, spec.key),
    )


def cell_scores(specs: Sequence[RunSpec], rows: dict[tuple[str, str], dict]) -> dict[str, float | None]:
    """Cell label -> its tune loss (mean over seeds; with an lr grid the best lr's mean), math.inf for a cell with a
    run that did not end ok, None for a cell with a run that has no row yet (the rung is not over)."""
    by_cell: dict[str, dict[float, list[float]]] = {}
    missing, failed = set(), set()
    for s in specs:
        row = rows.get((s.ablation, s.config_hash))
        label = str(s.value)
        by_cell.setdefault(label, {})
        if row is None:
            missing.add(label)
        elif row["status"] != "ok" or row.get("tune_loss") is None:
            failed.add(label)
        else:
            by_cell[label].setdefault(s.cfg.train.lr, []).append(float(row["tune_loss"]))
    scores: dict[str, float | None] = {}
    for label, per_lr in by_cell.items():
        if label in missing:
            scores[label] = None
        elif label in failed:
            scores[label] = math.inf
        else:
            scores[label] = min(sum(xs) / len(xs) for xs in per_lr.values())
    return scores


def choose(scores: dict[str, float], order: Sequence[str], eta: int = ETA) -> list[str]:
    """The better ceil(n/eta) cells by tune loss (ties: grid order), in grid order."""
    best = sorted(order, key=lambda c: (scores[c], order.index(c)))[: kept(len(order), eta)]
    return [c for c in order if c in best]


def read_record(out_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(out_dir) / HALVING_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def study_id(spec: RunSpec) -> str:
    """The halving record's key of a study: its name and study hash."""
    return f"{spec.ablation}/{spec.study_hash}"


def run_halving(
    specs: Sequence[RunSpec],
    out_dir: Path,
    runner: Runner | Executor,
    *,
    say: Callable[[str], None] = print,
    progress: bool = False,
) -> tuple[list[dict], list[RunSpec]]:
    """Run `specs` (every cell x seed of one or more studies at the full budget) rung by rung for the studies with
    `ablation.halving`, as one plain sweep for the rest. Returns the new rows and every spec the rungs planned."""
    out_dir = Path(out_dir)
    plain, studies = _split(specs)
    rows = run_sweep(plain, out_dir, runner, say=say, progress=progress) if plain else []
    planned = list(plain)
    for sid, group in studies.items():
        new, done = _halve(sid, group, out_dir, runner, say, progress)
        rows += new
        planned += done
    return rows, planned


def _split(specs: Sequence[RunSpec]) -> tuple[list[RunSpec], dict[str, list[RunSpec]]]:
    """The specs of studies without halving, and those with it by study (`study_id`), each in the given order."""
    plain: list[RunSpec] = []
    studies: dict[str, list[RunSpec]] = {}
    for s in specs:
        if s.cfg.ablation is not None and s.cfg.ablation.halving:
            studies.setdefault(study_id(s), []).append(s)
        else:
            plain.append(s)
    return plain, studies


def _cells(specs: Sequence[RunSpec]) -> list[str]:
    """The study's cell labels in grid order."""
    return list(dict.fromkeys(str(s.value) for s in specs))


def _budgets(specs: Sequence[RunSpec]) -> list[int]:
    return rung_tokens(specs[0].cfg.train.tokens, specs[0].cfg.train.batch_tokens)


def _rung(specs: Sequence[RunSpec], k: int, budgets: Sequence[int], cells: Sequence[str]) -> list[RunSpec]:
    """Rung k's runs: those of `cells`, on the rung's budget."""
    return [_at_budget(s, k, k == len(budgets) - 1, budgets[k]) for s in specs if str(s.value) in cells]


def _runs(rung: Sequence[RunSpec]) -> list[str]:
    """What a decision was made over, beyond its cells: the rung's runs (so a rerun with more seeds decides again)."""
    return sorted(s.config_hash for s in rung)


def _recorded(record: dict[str, Any], k: int, cells: Sequence[str], rung: Sequence[RunSpec]) -> list[str] | None:
    """The cells rung k kept, where the record holds its decision over these same cells and runs (a record older
    than the runs key: over these cells)."""
    done = record["rungs"][k] if k < len(record["rungs"]) else None
    same = done is not None and done["cells"] == list(cells) and done.get("runs", _runs(rung)) == _runs(rung)
    return done["kept"] if same else None


def _halve(
    sid: str, specs: list[RunSpec], out_dir: Path, runner: Runner | Executor, say: Callable[[str], None], progress: bool
) -> tuple[list[dict], list[RunSpec]]:
    budgets = _budgets(specs)
    record = read_record(out_dir).get(sid, {"rungs": []})
    cells, rows, planned = _cells(specs), [], []
    for k, tokens in enumerate(budgets):
        rung = _rung(specs, k, budgets, cells)
        say(f"halving {sid.split('/')[0]}: rung {k + 1}/{len(budgets)}, {len(cells)} cells on {tokens:,} tokens")
        rows += run_sweep(rung, out_dir, runner, say=say, progress=progress)
        planned += rung
        if k == len(budgets) - 1:
            break
        recorded = _recorded(record, k, cells, rung)
        if recorded is not None:  # decided before this sweep was stopped: keep to it
            cells = recorded
            continue
        scores = cell_scores(rung, latest(read_rows(out_dir)))
        if any(v is None for v in scores.values()):  # another process holds some runs: decide once they are in
            say(f"halving {sid.split('/')[0]}: rung {k + 1} is not complete; run the command again to continue")
            break
        nxt = choose(scores, cells)
        record["rungs"] = record["rungs"][:k] + [
            {
                "tokens": tokens,
                "cells": cells,
                "runs": _runs(rung),
                "kept": nxt,
                "tune_loss": {c: scores[c] for c in cells},
            }
        ]
        _write_record(out_dir, sid, record)
        cells = nxt
    return rows, planned


def _write_record(out_dir: Path, sid: str, record: dict) -> None:
    everything = read_record(out_dir)
    everything[sid] = record
    write_json_atomic(out_dir / HALVING_FILE, everything)


# ----------------------------------------------------------------------------- what a dry run shows


def halving_plan(specs: Sequence[RunSpec], out_dir: Path) -> tuple[list[RunSpec], list[str]]:
    """What `--dry-run` lists: the runs the command would train, as far as they are known (the plain studies' runs;
    of each halved study rung 1, and each later rung whose cells are decided), and lines saying what every rung
    trains and what the whole costs. Without halving: `specs` as they are, and no lines."""
    plain, studies = _split(specs)
    runs, lines = list(plain), []
    for sid, group in studies.items():
        known, text = _plan_study(sid, group, Path(out_dir))
        runs += known
        lines += text
    return runs, lines


def _plan_study(sid: str, specs: list[RunSpec], out_dir: Path) -> tuple[list[RunSpec], list[str]]:
    budgets, order = _budgets(specs), _cells(specs)
    record = read_record(out_dir).get(sid, {"rungs": []})
    sizes = [len(order)]
    for _ in budgets[1:]:
        sizes.append(kept(sizes[-1]))
    per_cell = len(specs) // len(order)  # seeds (x learning rates)
    seeds = len({s.seed for s in specs})
    lrs = len({s.cfg.train.lr for s in specs})
    each = f"{seeds} seed{'s' if seeds > 1 else ''}" + (f" x {lrs} learning rates" if lrs > 1 else "")
    known: list[RunSpec] = []
    lines = [f"halving {sid.split('/')[0]}: {len(budgets)} rungs, each keeping the better 1/{ETA} of its cells"]
    cells: list[str] | None = order
    for k, tokens in enumerate(budgets):
        n = sizes[k]
        what = f"{n} cells" if k == 0 else f"the better {n} of {sizes[k - 1]} cells by tune loss after rung {k}"
        text = f"  rung {k + 1}/{len(budgets)}: {what}, on {tokens:,} tokens each, {each}: {n * per_cell} runs"
        if cells is None:
            lines.append(text)
            continue
        rung = _rung(specs, k, budgets, cells)
        known += rung
        lines.append(f"{text}, listed above as {rung[0].ablation}" + (" (decided)" if k else ""))
        cells = _decided(record, k, cells, rung, out_dir) if k < len(budgets) - 1 else None
    spent = sum(n * per_cell * t for n, t in zip(sizes, budgets))
    grid = len(specs) * budgets[-1]
    parts = ", ".join(f"{n * per_cell} on {t:,}" for n, t in zip(sizes, budgets))
    lines.append(
        f"  total: {sum(sizes) * per_cell} runs ({parts} tokens) = {spent:,} tokens, as many as "
        f"{spent / budgets[-1]:.2f} full runs where the full grid trains {len(specs)} ({spent / grid:.0%})"
    )
    return known, lines


def _decided(record: dict[str, Any], k: int, cells: list[str], rung: list[RunSpec], out_dir: Path) -> list[str] | None:
    """The cells rung k keeps, where the command would know them before training anything: recorded, or chosen by
    tune loss once every run of the rung has its ok row (as `_halve` would choose them); None otherwise."""
    recorded = _recorded(record, k, cells, rung)
    if recorded is not None or not all(st == "done" for st in plan_states(rung, out_dir)):
        return recorded
    return choose(cell_scores(rung, latest(read_rows(out_dir))), cells)
