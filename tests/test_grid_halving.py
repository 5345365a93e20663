"""Successive halving over a grid without training: the rungs' budgets, the choice by tune loss (never validation),
the bookkeeping across a kill in the middle of a rung (nothing run twice, the recorded decision kept), and what the
report says about it."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from test_grid import GRID_YAML, Fake, quiet

from experiments.config.config import load_config, with_values
from experiments.report.markdown import write_report
from experiments.sweep.grid import SEP
from experiments.sweep.halving import HALVING_FILE, choose, kept, read_record, run_halving, rung_tokens
from experiments.sweep.plan import plan_runs
from experiments.sweep.results import append_row, read_rows
from experiments.sweep.sweep import run_sweep

CELLS = [f"{r}{SEP}{m}" for r in (4, 16, 64) for m in ("q_proj,v_proj", "attention", "attention,mlp")]
FULL, QUARTER, HALF = 300_000, 73_728, 147_456  # rung budgets of the defaults (8,192 tokens per step)


def halving_specs(seeds: int = 2):
    cfg = load_config(GRID_YAML)
    return plan_runs(with_values(cfg, [("ablation.halving", True, "test")]), name="x", seeds=seeds)


def test_rung_budgets_are_whole_steps_and_end_at_the_full_budget():
    assert rung_tokens(FULL, 8192) == [QUARTER, HALF, FULL]  # 9 and 18 steps of 8,192, then the run's own budget
    assert rung_tokens(8192, 8192) == [8192, 8192, 8192]  # never below one step
    assert [kept(n) for n in (9, 5, 3, 2, 1)] == [5, 3, 2, 1, 1]
    assert choose({"a": 2.0, "b": 1.0, "c": 1.0, "d": 0.5}, ["a", "b", "c", "d"]) == ["b", "d"]  # ties: grid order


def test_halving_keeps_the_better_half_by_tune_loss_and_trains_the_rest_no_further(tmp_path):
    specs = halving_specs()
    assert all(s.cfg.data.tune_fraction == 0.1 for s in specs)  # a tune split to choose by
    runner = Fake()
    rows, planned = run_halving(specs, tmp_path, runner, say=quiet)
    tokens = Counter(t for _, t, _ in runner.calls)
    assert tokens == {QUARTER: 18, HALF: 10, FULL: 6}  # 9 cells, then 5, then 3; two seeds each
    record = read_record(tmp_path)[f"rank_x_modules/{specs[0].study_hash}"]["rungs"]
    # The planted tune loss favours early cells, val ppl the attention + MLP ones: the choice follows tune loss.
    assert [r["kept"] for r in record] == [CELLS[:5], CELLS[:3]]
    assert [r["tokens"] for r in record] == [QUARTER, HALF]
    assert Counter(r["ablation"] for r in read_rows(tmp_path)) == {
        "rank_x_modules.rung0": 18,
        "rank_x_modules.rung1": 10,
        "rank_x_modules": 6,
    }
    assert len(rows) == 34 and len(planned) == 34
    final = [s for s in planned if s.ablation == "rank_x_modules"]
    assert {s.config_hash for s in final} <= {s.config_hash for s in specs}  # the full grid's own runs
    again = Fake()
    assert run_halving(specs, tmp_path, again, say=quiet)[0] == [] and again.calls == []


def test_a_kill_in_the_middle_of_a_rung_resumes_that_rung_and_runs_nothing_twice(tmp_path):
    specs = halving_specs()
    whole = Fake()
    run_halving(specs, tmp_path / "whole", whole, say=quiet)
    killed = Fake(kill_at=18 + 4)  # the fourth run of the second rung
    with pytest.raises(KeyboardInterrupt):
        run_halving(specs, tmp_path / "out", killed, say=quiet)
    sid = f"rank_x_modules/{specs[0].study_hash}"
    assert len(read_record(tmp_path / "out")[sid]["rungs"]) == 1  # the first rung's decision, written as made
    # A newer row makes a stopped first-rung cell the best by tune loss: the recorded decision stands, not remade.
    stopped = next(r for r in read_rows(tmp_path / "out") if r["value"] == CELLS[8])
    append_row(tmp_path / "out", {**stopped, "tune_loss": 0.0})
    resumed = Fake()
    run_halving(specs, tmp_path / "out", resumed, say=quiet)
    assert resumed.calls[0][2] is True and not any(c[2] for c in resumed.calls[1:])  # the killed run resumes
    finished = Counter(c[:2] for c in killed.calls[:-1] + resumed.calls)
    assert finished == Counter(c[:2] for c in whole.calls) and max(finished.values()) == 1
    assert read_record(tmp_path / "out") == read_record(tmp_path / "whole")


def test_report_says_what_halving_stopped_saved_and_whether_its_pick_is_the_full_grids(tmp_path):
    specs = halving_specs()
    run_halving(specs, tmp_path, Fake(), say=quiet)
    write_report(tmp_path, plots=False)
    text = (tmp_path / "report.md").read_text()
    assert "## rank_x_modules.rung" not in text  # earlier rungs are reported inside their grid's section
    assert "### Successive halving" in text and "stopped at rung 1" in text and "stopped at rung 2" in text
    assert "| 1 | 73,728 | rank 4 × q,v (1.0005), rank 4 × attention (1.0105)," in text  # tune loss, mean of 2 seeds
    assert "Halving trained 4,601,664 tokens where the full grid takes 5,400,000 (85%)" in text
    assert "late bloomer" in text and "run the grid in full in this folder (without --halving, with --set " in text
    assert "data.tune_fraction=0.1: the same configs" in text
    # Stopped cells keep their place in the grid's order.
    assert "| rank \\ modules | q,v | attention | attention,mlp |" in text
    assert "| rank 16 | stopped at rung 2 | stopped at rung 2 | stopped at rung 1 |" in text
    # The full grid in the same folder, with the same tune split: the kept cells' runs are reused, not retrained.
    cfg = with_values(load_config(GRID_YAML), [("data.tune_fraction", 0.1, "test")])
    full = Fake()
    run_sweep(plan_runs(cfg, name="x", seeds=2), tmp_path, full, say=quiet)
    assert len(full.calls) == 12
    write_report(tmp_path, plots=False)
    text = (tmp_path / "report.md").read_text()
    assert "The full grid ran as well: its recommended cell is rank 4 × attention,mlp; halving's is rank 4 × " in text
    assert json.loads((tmp_path / HALVING_FILE).read_text())  # the record stays beside the results


def test_more_seeds_in_the_same_folder_decide_each_rung_again(tmp_path):
    """A decision holds for the runs it was made over: rerun with a third seed, rung 1 is decided again on three
    seeds' tune losses (the recorded two-seed choice would otherwise stand), and the record says over which runs."""
    two = halving_specs(seeds=2)
    run_halving(two, tmp_path, Fake(), say=quiet)
    sid = f"rank_x_modules/{two[0].study_hash}"
    first = read_record(tmp_path)[sid]["rungs"][0]
    assert len(first["runs"]) == 18 and first["kept"] == CELLS[:5]
    # Plant a two-seed decision no tune loss supports: kept as long as the runs are the same, remade on three seeds.
    planted = {**read_record(tmp_path), sid: {"rungs": [{**first, "kept": CELLS[4:]}]}}
    (tmp_path / HALVING_FILE).write_text(json.dumps(planted))
    again = Fake()
    run_halving(two, tmp_path, again, say=quiet)
    assert again.calls and all(any(f"={c}-" in name for c in CELLS[4:]) for name, _, _ in again.calls)  # trusted
    run_halving(halving_specs(seeds=3), tmp_path, Fake(), say=quiet)
    rung0 = read_record(tmp_path)[sid]["rungs"][0]
    assert len(rung0["runs"]) == 27 and rung0["kept"] == CELLS[:5]  # decided again, by the planted tune losses
