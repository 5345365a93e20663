"""What a sweep runs: the runs an ablation asks for (value x seed [x lr]), and which of them are done already.

A `RunSpec` is one run with its fully resolved config; the executors and runners (below in the import order) and
the sweep that drives them (`experiments.sweep.sweep`) all take it from here.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data.cache import json_hash
from experiments.config.config import Config, get_value, resolve_key, set_dotted, with_value, with_values
from experiments.finetune.row import read_result
from experiments.sweep.grid import grid_cells, grid_key, split_key
from experiments.sweep.results import latest, read_rows, value_label
from training.checkpoint import CHECKPOINT_FILE


@dataclass
class RunSpec:
    """One run of a sweep: an ablation's value at one seed, with its fully resolved config."""

    ablation: str
    key: str  # dotted path of the swept key ("" for a config without an ablation block)
    value: Any
    value_index: int | None  # position in the ablation's `values` (None: a value given on the command line)
    is_baseline: bool
    seed: int
    cfg: Config
    config_hash: str
    study_hash: str

    @property
    def name(self) -> str:
        lr = f"-lr{self.cfg.train.lr:g}" if has_lr_grid(self.cfg) else ""
        return f"{self.ablation}={value_label(self.value)}{lr}-seed{self.seed}"

    def run_dir(self, out_dir: Path) -> Path:
        return Path(out_dir) / "runs" / self.config_hash


def has_lr_grid(cfg: Config) -> bool:
    """A run of an lr grid: its ablation trains every value at each of several learning rates. (Halving holds out
    a tune split too, without an lr grid.)"""
    return cfg.ablation is not None and bool(cfg.ablation.lr_grid)


def study_hash(cfg: Config, key: str) -> str:
    """What the runs of one study share: the config with the swept key and the seed (and, where the runs hold out a
    tune split, the learning rate) blanked out. Rows with the same ablation and study hash belong in one table.
    The tune split decides, not `has_lr_grid`: the hashes of recorded lr grids and halving studies were made so.
    (Hence two halving studies, or two with --set data.tune_fraction, that differ only in train.lr share one.)"""
    d = cfg.to_dict()
    d.pop("ablation")
    d["train"]["seed"] = None
    if cfg.data.tune_fraction > 0:
        d["train"]["lr"] = None
    for k in split_key(key):  # a grid's key names several
        set_dotted(d, k, None)
    return json_hash(d)


def plan_runs(
    cfg: Config, *, name: str, values: Sequence[Any] | None = None, seeds: int = 1, source: str = "command line"
) -> list[RunSpec]:
    """The runs of one ablation config: every value (or just `values`), each at seeds train.seed + i, and with an
    `ablation.lr_grid` at every learning rate of the grid (with a tune split of `ablation.tune_fraction`).

    Seed-major order (all values at the first seed, then the next seed), so a sweep stopped early still has one
    point per value. Values outside the ablation's list are allowed; each is validated like a config file.
    """
    if seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {seeds}")
    a = cfg.ablation
    grid = a is not None and bool(a.grid)  # several keys swept jointly: each cell is one value (experiments.sweep.grid)
    key = grid_key(a.grid) if grid else resolve_key(a.key) if a is not None else ""
    listed = list(a.values) if a is not None else [None]
    chosen = list(values) if values is not None else listed
    baseline = (a.baseline if a.baseline is not None else listed[0]) if a is not None and not grid else None
    if a is not None and (a.lr_grid or a.halving):  # halving, too, keeps cells by their loss on the tune split
        cfg = with_value(cfg, "data.tune_fraction", a.tune_fraction, source=source)
    lrs: list[float | None] = list(a.lr_grid) if a is not None and a.lr_grid else [None]  # None: the config's own
    per_value = [(c.cfg, c.label, c.index, c.is_baseline) for c in grid_cells(cfg, source)] if grid else []
    for v in [] if grid else chosen:
        vcfg = with_value(cfg, key, v, source=source) if key else cfg
        norm = get_value(vcfg, key) if key else None  # "q_proj,v_proj" -> ["q_proj", "v_proj"]
        idx = next((i for i, lv in enumerate(listed) if lv == norm), None)
        per_value.append((vcfg, norm, idx, norm == baseline))
    specs = []
    for i, lr, (vcfg, norm, idx, is_base) in itertools.product(range(seeds), lrs, per_value):
        changes = [("train.seed", vcfg.train.seed + i, source)] + ([("train.lr", lr, source)] if lr else [])
        scfg = with_values(vcfg, changes)
        specs.append(
            RunSpec(
                ablation=a.name if a is not None and a.name else name,
                key=key,
                value=norm,
                value_index=idx,
                is_baseline=is_base,
                seed=scfg.train.seed,
                cfg=scfg,
                config_hash=scfg.hash(),
                study_hash=study_hash(scfg, key),
            )
        )
    return specs


# ----------------------------------------------------------------------------- what is done already


def run_state(spec: RunSpec, out_dir: Path, rows: dict[tuple[str, str], dict], planned: set[str]) -> str:
    """ "done" (an ok row for this ablation), "reuse" (this exact config finished ok elsewhere, or runs earlier in
    this sweep), "resume" (a checkpoint of an interrupted run exists), "retry" (its last row was not ok) or "run".
    `planned`: the config hashes of the specs before this one in the sweep."""
    row = rows.get((spec.ablation, spec.config_hash))
    if row is not None and row["status"] == "ok":
        return "done"
    run_dir = spec.run_dir(out_dir)
    done_elsewhere = any(r["status"] == "ok" for (_, h), r in rows.items() if h == spec.config_hash)
    result = read_result(run_dir)
    if done_elsewhere or (result is not None and result.get("status") == "ok") or spec.config_hash in planned:
        return "reuse"
    if (run_dir / CHECKPOINT_FILE).exists():
        return "resume"
    return "retry" if row is not None else "run"


def plan_states(specs: Sequence[RunSpec], out_dir: Path) -> list[str]:
    rows = latest(read_rows(out_dir))
    states, seen = [], set()
    for s in specs:
        states.append(run_state(s, out_dir, rows, seen))
        seen.add(s.config_hash)
    return states
