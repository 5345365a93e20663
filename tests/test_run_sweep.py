"""Sweep logic without training: planning, skipping, reuse, resume, failures, the results file.

A fake runner stands in for training here (fast); tests/test_run_e2e.py runs the same paths with the real one.
"""

from __future__ import annotations

import csv
import json
import os
import textwrap
from pathlib import Path

import pytest

from experiments.config.config import load_config
from experiments.run import DEFAULT_STUDY
from experiments.sweep import results
from experiments.sweep.plan import plan_runs, plan_states
from experiments.sweep.results import COLUMNS, RESULTS_CSV, RESULTS_JSONL, read_rows
from experiments.sweep.runners import subprocess_runner
from experiments.sweep.sweep import run_sweep


def fake_result(cfg, **over) -> dict:
    """What train_run would say, with numbers that depend on the config (so tables are not all equal)."""
    r = cfg.lora.rank
    res = {
        "status": "ok",
        "error": None,
        "val_loss": 2.0 - 0.01 * r,
        "val_ppl": 7.0 - 0.05 * r,
        "base_val_ppl": 9.0,
        "train_tokens": cfg.train.tokens,
        "steps": 4,
        "train_time_s": 1.0 + 0.1 * r,
        "tokens_per_s": 1000.0,
        "trainable_params": 1000 * r * len(cfg.lora.target_modules),
        "total_params": 10**6,
        "peak_rss_bytes": 2**28 + r * 2**20,
        "saved_for_backward_bytes": 2**20,
        "device": "cpu (fake)",
        "dtype": "float32",
        "torch_version": "x",
        "world_size": 1,
        "corpus_fingerprint": "c",
        "base_fingerprint": "b",
    }
    res.update(over)
    return res


class FakeRunner:
    def __init__(self, fail_on: str | None = None):
        self.calls: list[tuple[str, bool]] = []
        self.fail_on = fail_on

    def __call__(self, spec, run_dir: Path, resume: bool) -> dict:
        self.calls.append((spec.name, resume))
        if self.fail_on and self.fail_on in spec.cfg.lora.target_modules:
            return fake_result(spec.cfg, status="failed", error="ValueError: matched no module")
        return fake_result(spec.cfg)


def rank_specs(seeds: int = 1, values=None):
    cfg = load_config(DEFAULT_STUDY[0])
    return plan_runs(cfg, name="abl_lora_rank", values=values, seeds=seeds)


def test_plan_order_seeds_and_baseline():
    specs = rank_specs(seeds=2)
    assert [(s.value, s.seed) for s in specs] == [(v, i) for i in (0, 1) for v in (4, 8, 16, 32, 64)]
    assert len({s.config_hash for s in specs}) == 10
    assert len({s.study_hash for s in specs}) == 1  # one table: values and seeds share the study
    assert [s.is_baseline for s in specs[:5]] == [False, False, True, False, False]
    assert all(s.cfg.lora.rank == s.value and s.cfg.train.seed == s.seed for s in specs)
    off = rank_specs(values=[12])
    assert off[0].value == 12 and off[0].value_index is None and not off[0].is_baseline


def test_sweep_rows_skip_and_csv(tmp_path):
    specs = rank_specs()
    runner = FakeRunner()
    rows = run_sweep(specs, tmp_path, runner, say=lambda s: None)
    assert len(rows) == 5 and len(runner.calls) == 5
    on_disk = read_rows(tmp_path)
    assert [r["value"] for r in on_disk] == [4, 8, 16, 32, 64]
    assert tuple(on_disk[0]) == COLUMNS  # flat, every column, in order
    with open(tmp_path / RESULTS_CSV, newline="") as f:
        assert len(list(csv.DictReader(f))) == 5
    assert on_disk[0]["git_commit"] and on_disk[0]["peak_memory_bytes"] == on_disk[0]["peak_rss_bytes"]
    # The same command again: everything is done, nothing runs, no row is added.
    again = FakeRunner()
    assert run_sweep(specs, tmp_path, again, say=lambda s: None) == [] and again.calls == []
    assert plan_states(specs, tmp_path) == ["done"] * 5


def test_failure_is_recorded_and_sweep_goes_on_then_retried(tmp_path):
    cfg = load_config(DEFAULT_STUDY[1])
    specs = plan_runs(cfg, name="t", values=None)
    runner = FakeRunner(fail_on="fc1")
    rows = run_sweep(specs, tmp_path, runner, say=lambda s: None)
    assert [r["status"] for r in rows] == ["ok", "ok", "failed", "failed"]
    assert "matched no module" in rows[2]["error"]
    assert plan_states(specs, tmp_path) == ["done", "done", "retry", "retry"]
    fixed = FakeRunner()
    run_sweep(specs, tmp_path, fixed, say=lambda s: None)
    assert len(fixed.calls) == 2
    assert len(read_rows(tmp_path)) == 6  # appended, never rewritten in place
    assert plan_states(specs, tmp_path) == ["done"] * 4  # the latest row per run counts


def test_shared_baseline_runs_once_across_ablations(tmp_path):
    specs = [s for p in DEFAULT_STUDY for s in plan_runs(load_config(p), name=p.stem)]
    assert len(specs) == 13
    states = plan_states(specs, tmp_path)
    assert states.count("reuse") == 2  # rank 16 = targets [q,v] = context 512: the same config
    runner = FakeRunner()
    rows = run_sweep(specs, tmp_path, runner, say=lambda s: None)
    assert len(runner.calls) == 11 and len(rows) == 13
    reused = [r for r in rows if r["reused_from"]]
    assert {r["ablation"] for r in reused} == {"target_modules", "context_length"}
    assert len({r["config_hash"] for r in reused}) == 1 and all(r["status"] == "ok" for r in reused)


def test_interrupted_run_resumes_from_checkpoint_and_finished_result_is_not_rerun(tmp_path):
    specs = rank_specs(values=[4, 8])
    # Run 4 finished but the sweep died before writing its row; run 8 was killed mid-way with a checkpoint.
    d4, d8 = specs[0].run_dir(tmp_path), specs[1].run_dir(tmp_path)
    d4.mkdir(parents=True)
    (d4 / "result.json").write_text(json.dumps(fake_result(specs[0].cfg)))
    d8.mkdir(parents=True)
    (d8 / "checkpoint.pt").write_bytes(b"x")
    assert plan_states(specs, tmp_path) == ["reuse", "resume"]
    runner = FakeRunner()
    rows = run_sweep(specs, tmp_path, runner, say=lambda s: None)
    assert runner.calls == [(specs[1].name, True)]
    assert [r["status"] for r in rows] == ["ok", "ok"]


def test_subprocess_crash_without_result_is_a_failed_row(tmp_path, monkeypatch):
    """A training process that dies without result.json (segfault, OOM killer) costs one row, with its stderr."""
    fake = tmp_path / "fakepkg" / "experiments_crash.py"
    fake.parent.mkdir()
    fake.write_text(
        textwrap.dedent("""
        import os, sys
        sys.stderr.write("loading...\\nRuntimeError: something broke deep inside\\n"); sys.stderr.flush()
        os._exit(3)
    """)
    )
    monkeypatch.setenv("PYTHONPATH", str(fake.parent))
    specs = rank_specs(values=[4])
    runner = subprocess_runner(progress=False, echo=False, module="experiments_crash")
    rows = run_sweep(specs, tmp_path / "out", runner, say=lambda s: None)
    assert rows[0]["status"] == "failed"
    assert "exit code 3" in rows[0]["error"] and "something broke deep inside" in rows[0]["error"]
    assert "something broke" in (specs[0].run_dir(tmp_path / "out") / "train.log").read_text()


def test_results_file_is_replaced_atomically(tmp_path, monkeypatch):
    """A crash while writing leaves the previous file intact: rows go to a temp file that is then renamed."""
    run_sweep(rank_specs(values=[4]), tmp_path, FakeRunner(), say=lambda s: None)
    before = (tmp_path / RESULTS_JSONL).read_text()
    row = read_rows(tmp_path)[0]

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)  # the one atomic writer (data.cache) renames with os.replace
    with pytest.raises(OSError):
        results.append_row(tmp_path, row)
    assert (tmp_path / RESULTS_JSONL).read_text() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
