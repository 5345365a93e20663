"""`--dry-run --halving` lists what the command would train next, rung by rung as far as the rungs are decided, and
says what the rest will train and cost; halving's run names carry no learning rate unless an lr grid does. All
in-process with a fake runner where rows are needed: nothing here trains."""

from __future__ import annotations

import json
import math
from pathlib import Path

from test_grid import GRID_YAML, Fake, quiet

from experiments.config.config import DEFAULTS_FILE, load_config, with_values
from experiments.run import build_parser, main, resolve_runs
from experiments.sweep.grid import SEP
from experiments.sweep.halving import HALVING_FILE, run_halving, study_id

GRID_FLAGS = ["--grid", "lora.rank=4,16,64", "--grid", "lora.target_modules=[q_proj,v_proj],attention,all-linear"]
CELLS = [f"{r}{SEP}{m}" for r in (4, 16, 64) for m in ("q_proj,v_proj", "attention", "all-linear")]
YAML_FLAGS = ["--config", str(GRID_YAML)]  # its cells are the ones test_grid.planted knows


def budgets() -> tuple[int, int, int]:
    """Rung budgets from the defaults: a quarter and a half of train.tokens in whole steps, then all of it."""
    train = load_config(DEFAULTS_FILE).train
    steps = [max(1, round(train.tokens / d / train.batch_tokens)) for d in (4, 2)]
    return steps[0] * train.batch_tokens, steps[1] * train.batch_tokens, train.tokens


def dry_run(argv: list[str], out: Path, capsys) -> tuple[list[tuple[str, str, str]], list[str]]:
    """(ablation, config hash, state) of every run listed, and the lines after the table."""
    assert main([*argv, "--out", str(out), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    runs = [(p[0], p[-3], p[-2]) for p in (line.split() for line in lines) if "/runs/" in p[-1]]
    return runs, lines[lines.index(next(line for line in lines if line.startswith("halving "))) :]


def specs_of(argv: list[str]):
    return resolve_runs(build_parser().parse_args(argv))


def at(specs, tokens: int, cells) -> list[str]:
    """Config hashes of the runs of `cells` on `tokens`, built here from the full-budget specs."""
    return [with_values(s.cfg, [("train.tokens", tokens, "test")]).hash() for s in specs if s.value in cells]


def files(folder: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_dry_run_lists_rung_one_and_says_what_the_undecided_rungs_train(tmp_path, capsys):
    argv = [*GRID_FLAGS, "--seeds", "2", "--halving"]
    quarter, half, full = budgets()
    runs, lines = dry_run(argv, tmp_path / "out", capsys)
    specs = specs_of(argv)
    assert len(specs) == 18
    assert runs == [("grid.rung0", h, "run") for h in at(specs, quarter, CELLS)]  # 9 cells x 2 seeds on a quarter
    second, third = math.ceil(9 / 2), math.ceil(math.ceil(9 / 2) / 2)
    assert lines[1] == f"  rung 1/3: 9 cells, on {quarter:,} tokens each, 2 seeds: 18 runs, listed above as grid.rung0"
    assert lines[2] == (
        f"  rung 2/3: the better {second} of 9 cells by tune loss after rung 1, on {half:,} tokens each, 2 seeds: "
        f"{2 * second} runs"
    )
    assert lines[3] == (
        f"  rung 3/3: the better {third} of {second} cells by tune loss after rung 2, on {full:,} tokens each, "
        f"2 seeds: {2 * third} runs"
    )
    spent = 18 * quarter + 2 * second * half + 2 * third * full
    assert lines[4] == (
        f"  total: {18 + 2 * second + 2 * third} runs (18 on {quarter:,}, {2 * second} on {half:,}, {2 * third} on "
        f"{full:,} tokens) = {spent:,} tokens, as many as {spent / full:.2f} full runs where the full grid trains 18 "
        f"({spent / (18 * full):.0%})"
    )
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_a_recorded_decision_lists_the_kept_cells_next_rung(tmp_path, capsys):
    argv = [*GRID_FLAGS, "--seeds", "2", "--halving"]
    quarter, half, _ = budgets()
    specs = specs_of(argv)
    kept = [CELLS[8], CELLS[6], CELLS[4], CELLS[2], CELLS[0]]  # not grid order's first five: the record decides
    rung = {"tokens": quarter, "cells": CELLS, "kept": kept, "tune_loss": {c: 1.0 for c in CELLS}}
    out = tmp_path / "out"
    out.mkdir()
    (out / HALVING_FILE).write_text(json.dumps({study_id(specs[0]): {"rungs": [rung]}}))
    before = files(out)
    runs, lines = dry_run(argv, out, capsys)
    assert runs[:18] == [("grid.rung0", h, "run") for h in at(specs, quarter, CELLS)]
    assert runs[18:] == [("grid.rung1", h, "run") for h in at(specs, half, kept)]  # 5 kept cells x 2 seeds
    assert lines[2].endswith("2 seeds: 10 runs, listed above as grid.rung1 (decided)")
    assert lines[3].startswith("  rung 3/3: the better 3 of 5 cells") and "listed" not in lines[3]
    assert files(out) == before  # nothing written, the record untouched


def test_states_follow_the_folder_and_rows_decide_a_rung_the_record_missed(tmp_path, capsys):
    argv = [*YAML_FLAGS, "--seeds", "2", "--halving"]
    quarter, half, full = budgets()
    specs = specs_of(argv)
    out = tmp_path / "out"
    try:
        run_halving(specs, out, Fake(kill_at=18 + 3), say=quiet)  # killed in the third run of rung 2
    except KeyboardInterrupt:
        pass
    cells = list(dict.fromkeys(s.value for s in specs))
    kept = cells[:5]  # test_grid.planted's tune loss grows along grid order
    expected = [("rank_x_modules.rung0", h, "done") for h in at(specs, quarter, cells)]
    states = ["done", "done", "resume"] + ["run"] * 7  # rung 2's runs in order: two finished, one killed
    expected += [("rank_x_modules.rung1", h, st) for h, st in zip(at(specs, half, kept), states)]
    before = files(out)
    assert dry_run(argv, out, capsys)[0] == expected
    # Two sweeps that each left rung 1 to the other write no decision; its rows are all in, so the cells are known.
    (out / HALVING_FILE).unlink()
    runs, lines = dry_run(argv, out, capsys)
    assert runs == expected and "(decided)" in lines[2]
    assert files(out) == {k: v for k, v in before.items() if not k.endswith(HALVING_FILE)}
    run_halving(specs, out, Fake(), say=quiet)  # finish: every rung listed, done, at the full budget last
    runs, lines = dry_run(argv, out, capsys)
    assert len(runs) == 34 and {st for _, _, st in runs} == {"done"}
    assert [h for a, h, _ in runs if a == "rank_x_modules"] == at(specs, full, cells[:3])
    assert all("listed above" in line for line in lines[1:4])


def test_run_names_carry_the_lr_only_under_an_lr_grid(tmp_path, capsys):
    halved = specs_of([*GRID_FLAGS, "--halving"])
    assert halved[0].cfg.data.tune_fraction > 0  # halving holds out a tune split, yet names no lr
    assert halved[0].name == f"grid={CELLS[0]}-seed0" and not any("-lr" in s.name for s in halved)
    tuned = specs_of([*GRID_FLAGS, "--set", "data.tune_fraction=0.1"])  # a full grid that reuses halving's runs
    assert [s.name for s in tuned] == [s.name for s in halved]
    gridded = specs_of([*GRID_FLAGS, "--lr-grid", "1e-3,3e-3"])
    assert [s.name for s in gridded[:2]] == [f"grid={CELLS[0]}-lr0.001-seed0", f"grid={CELLS[1]}-lr0.001-seed0"]
    assert {s.name.split("-lr")[1].split("-")[0] for s in gridded} == {"0.001", "0.003"}
    both = [*GRID_FLAGS, "--lr-grid", "1e-3,3e-3", "--halving", "--seeds", "2"]
    assert all("-lr" in s.name for s in specs_of(both))
    _, lines = dry_run(both, tmp_path / "out", capsys)
    assert lines[1].endswith("2 seeds x 2 learning rates: 36 runs, listed above as grid.rung0")
    plain = specs_of([*GRID_FLAGS])
    assert not any("-lr" in s.name for s in plain)
