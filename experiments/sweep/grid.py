"""A grid study: several keys swept jointly, every combination of their values (a *cell*) at every seed.

`ablation.grid: {lora.rank: [4, 16, 64], lora.target_modules: [[q_proj, v_proj], all-linear]}` in YAML, or
`--grid KEY=V1,V2,...` (repeatable) on the command line. Each cell is one value of the study to the rest of the lab
(plan, resume, locks, executors, preflight, lr grid, report), so nothing downstream needs a second code path. A cell's
row keeps the one-key row's columns: `key` is the grid's keys joined by SEP ("lora.rank × lora.target_modules") and
`value` the cell's values joined the same way ("16 × q_proj,v_proj"); `value_index` is the cell's position in the
row-major product. pandas splits them with `df.value.str.split(" × ", expand=True)`. Seeds pair across cells: the
same seed gives the same data order and LoRA initialisation in every cell.
"""

from __future__ import annotations

import argparse
import itertools
from dataclasses import dataclass
from typing import Any

from experiments.config.config import (
    Config,
    ConfigError,
    from_dict,
    get_value,
    parse_value,
    resolve_key,
    with_value,
    with_values,
)
from experiments.sweep.results import value_label

SEP = " × "  # between the keys of a grid's `key` and the values of a cell's `value`


def grid_key(grid: dict[str, list[Any]]) -> str:
    """The row's `key` of a grid study: its dotted keys, in the grid's order, joined by SEP."""
    return SEP.join(resolve_key(str(k)) for k in grid)


def split_key(key: str | None) -> list[str]:
    """The dotted keys a row's `key` names: several for a grid, one for an ablation, none without an ablation."""
    return key.split(SEP) if key else []


def is_grid(key: str | None) -> bool:
    return bool(key) and SEP in key


def split_value(value: Any) -> list[Any]:
    """A cell's row value back as one value per key, read as YAML: "16 × q_proj,v_proj" -> [16, "q_proj,v_proj"]."""
    return [parse_value(p) for p in str(value).split(SEP)]


def cell_label(values: tuple[Any, ...] | list[Any]) -> str:
    return SEP.join(str(value_label(v)) for v in values)


@dataclass(frozen=True)
class Cell:
    """One combination of a grid: its values (normalised, in the grid's key order) and its config."""

    values: tuple[Any, ...]
    index: int  # position in the row-major product of the grid's value lists
    is_baseline: bool
    cfg: Config

    @property
    def label(self) -> str:
        return cell_label(self.values)


def grid_cells(cfg: Config, source: str = "command line") -> list[Cell]:
    """Every combination of `cfg.ablation.grid`, in row-major order (the last key varies fastest), each validated
    as a whole config. The baseline cell takes `ablation.baseline`'s value for the keys it names, else each key's
    first value."""
    a = cfg.ablation
    keys = [resolve_key(str(k), source) for k in a.grid]
    # Normalised values ("q_proj,v_proj" -> ["q_proj", "v_proj"]), so a cell's label does not depend on the spelling.
    axes = [[get_value(with_value(cfg, k, v, source=source), k) for v in vs] for k, vs in zip(keys, a.grid.values())]
    named = {resolve_key(str(k), source): v for k, v in (a.baseline or {}).items()}
    base = tuple(
        axis[list(a.grid.values())[i].index(named[k])] if k in named else axis[0]
        for i, (k, axis) in enumerate(zip(keys, axes))
    )
    cells = []
    for index, combo in enumerate(itertools.product(*axes)):
        ccfg = with_values(cfg, [(k, v, source) for k, v in zip(keys, combo)])
        cells.append(Cell(tuple(combo), index, combo == base, ccfg))
    return cells


def parse_grid_flag(text: str) -> tuple[str, list[Any]]:
    """`--grid KEY=V1,V2,...` -> (dotted key, values). The values are one YAML flow list, so a list value is written
    in brackets: `lora.target_modules=[q_proj,v_proj],all-linear`."""
    key, eq, rest = text.partition("=")
    values = parse_value(f"[{rest}]") if eq else None
    if not key.strip() or not isinstance(values, list) or not values:
        raise ConfigError(
            f"--grid {text}: expected KEY=V1,V2,... with a dotted key and its values, e.g. --grid lora.rank=4,16,64 "
            "or --grid 'lora.target_modules=[q_proj,v_proj],all-linear' (a list value in brackets)."
        )
    return resolve_key(key.strip(), f"--grid {text}"), values


def with_grid(cfg: Config, flags: list[str], name: str) -> Config:
    """`cfg` with the --grid flags applied: each sets (or replaces) one key's values in `ablation.grid`. A one-key
    ablation's key and values become the grid's first axis; a config without an ablation becomes a grid study named
    `name` over the flags' keys."""
    if not flags:
        return cfg
    parsed = dict(parse_grid_flag(f) for f in flags)
    data = cfg.to_dict()
    a = data.get("ablation") or {}
    old = {resolve_key(str(k)): v for k, v in (a.get("grid") or {}).items()}
    baseline = a.get("baseline") if old else None
    if a.get("key") and not old:  # a one-key ablation's key and values become the grid's first axis
        old = {resolve_key(a["key"]): a["values"]}
        baseline = {resolve_key(a["key"]): a["baseline"]} if a.get("baseline") is not None else None
    grid = {**old, **parsed}
    data["ablation"] = {
        **a,
        "name": a.get("name") or name,
        "key": None,
        "values": [],
        "baseline": {  # a key's baseline stays while --grid keeps its value among the key's values
            resolve_key(str(k)): v
            for k, v in (baseline or {}).items()
            if resolve_key(str(k)) not in parsed or v in parsed[resolve_key(str(k))]
        }
        or None,
        "grid": grid,
    }
    return from_dict(data, source=", ".join(f"--grid {f}" for f in flags))


def check_not_swept(cfg: Config, items: list[tuple[str, Any, str]]) -> None:
    """A setting that names a key the grid sweeps would be overwritten in every cell: say so, before any work."""
    if cfg.ablation is None or not cfg.ablation.grid:
        return
    swept = {resolve_key(str(k)) for k in cfg.ablation.grid}
    for key, _, source in items:
        if resolve_key(key, source) in swept:
            raise ConfigError(
                f"{source}: {resolve_key(key)} is a key this grid sweeps, so every cell would overwrite it; give its "
                f"values with --grid {resolve_key(key)}=V1,V2,... instead."
            )


def add_grid_flags(ap: argparse.ArgumentParser) -> None:
    """--grid and --halving, for `python -m experiments.run`."""
    ap.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2,...",
        help="sweep this key jointly with the others given (repeatable): every combination x seeds, e.g. "
        "--grid lora.rank=4,16,64 --grid 'lora.target_modules=[q_proj,v_proj],all-linear'; with --config, adds to "
        "(or replaces a key of) its grid, or makes its one-key ablation a grid; sets ablation.grid",
    )
    ap.add_argument(
        "--halving",
        action="store_true",
        help="successive halving over a grid's cells: all on 1/4 of the tokens, the better half by tune loss on 1/2, "
        "the better half of those on all (sets ablation.halving)",
    )
