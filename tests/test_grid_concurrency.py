"""Time columns that mean something: each row says how many runs the sweep was training at once while it trained
(`concurrency`), a copied row carries its original's, and the report says under what concurrency a study's times
were measured, warning where a study mixes them (older rows, without the column, read as before)."""

from __future__ import annotations

import shutil
from pathlib import Path

from test_grid import Fake, quiet

from experiments.config.config import CONFIG_DIR, load_config
from experiments.report.concurrency import concurrency_note
from experiments.report.markdown import study_header
from experiments.report.studies import load_studies
from experiments.sweep.executors import Executor
from experiments.sweep.plan import plan_runs
from experiments.sweep.results import read_rows
from experiments.sweep.sweep import run_sweep

REPO = Path(__file__).resolve().parent.parent
RANK = CONFIG_DIR / "abl_lora_rank.yaml"


class Pairs(Executor):
    """Two runs in flight at a time, finished in the order they were handed over (deterministic, no threads)."""

    parallel = True

    def __init__(self, runner) -> None:
        self.runner, self.held = runner, []

    def free(self) -> bool:
        return len(self.held) < 2

    def submit(self, spec, run_dir: Path, resume: bool) -> None:
        self.held.append((spec, run_dir, resume))

    def next_done(self):
        spec, run_dir, resume = self.held.pop(0)
        return spec, self.runner(spec, run_dir, resume)

    def close(self) -> None:
        self.held.clear()


def test_rows_say_how_many_runs_shared_the_machine_and_copies_keep_the_original(tmp_path):
    specs = plan_runs(load_config(RANK), name="lora_rank", values=[4, 16, 64])
    run_sweep(specs, tmp_path, Pairs(Fake()), say=quiet)
    # 4 and 16 start together; 64 starts when 4 ends, beside 16; then 64 trains on after 16 ended: still 2 at its peak.
    assert [r["concurrency"] for r in read_rows(tmp_path)] == [2, 2, 2]
    alone = plan_runs(load_config(RANK), name="lora_rank", values=[4], seeds=2)[1:]  # rank 4 at seed 1
    run_sweep(alone, tmp_path, Fake(), say=quiet)
    assert read_rows(tmp_path)[-1]["concurrency"] == 1
    # The modules ablation's baseline is the rank ablation's rank 16: copied, with the concurrency it trained under.
    twin = [s for s in plan_runs(load_config(CONFIG_DIR / "abl_target_modules.yaml"), name="m") if s.is_baseline]
    run_sweep(twin, tmp_path, Fake(), say=quiet)
    copied = read_rows(tmp_path)[-1]
    assert copied["reused_from"] and copied["concurrency"] == 2


def test_the_report_says_under_what_concurrency_times_were_measured(tmp_path):
    specs = plan_runs(load_config(RANK), name="lora_rank", values=[4, 16, 64])
    run_sweep(specs[:1], tmp_path, Fake(), say=quiet)
    (st,) = load_studies(tmp_path)
    assert "- train time measured with 1 run at a time (each run had the machine to itself)" in study_header(st)
    run_sweep(specs, tmp_path, Pairs(Fake()), say=quiet)
    (st,) = load_studies(tmp_path)
    header = study_header(st)
    assert "**train times were measured under different concurrency** (1 run at a time: 1 run; up to 2 runs at " in (
        header
    )
    assert "compare train times only between runs of equal concurrency" in header
    assert concurrency_note([{"status": "ok", "concurrency": 4}] * 2) == (
        "- train time measured with up to 4 runs at once: times include sharing the machine"
    )


def test_rows_written_before_the_column_read_as_before(tmp_path):
    shutil.copy(REPO / "docs/default_study/results.jsonl", tmp_path / "results.jsonl")
    assert not any("concurrency" in r for r in read_rows(tmp_path))
    assert all("concurrency" not in study_header(st) for st in load_studies(tmp_path))
