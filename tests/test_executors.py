"""Executors without training: how --jobs becomes slots, a pool's order and reuse, stopping children, the Ray
probe, and the flags. Fake runners stand in for training; tests/test_run_e2e.py runs the real thing."""

from __future__ import annotations

import os
import signal
import textwrap
import threading
from pathlib import Path

import pytest
from proc_helpers import FAILURE_BOUND_S, alive, wait_until

from experiments.config.config import load_config
from experiments.finetune.row import RESULT_KEYS
from experiments.run import DEFAULT_STUDY, main
from experiments.sweep import sweep as sweep_module
from experiments.sweep.executors import (
    PROBE_FILE,
    ExecutorError,
    LocalPool,
    Sequential,
    Slot,
    check_shared,
    local_executor,
    plan_slots,
)
from experiments.sweep.plan import plan_runs, plan_states
from experiments.sweep.results import append_row as real_append_row
from experiments.sweep.results import read_rows
from experiments.sweep.runners import subprocess_runner
from experiments.sweep.sweep import run_sweep


def test_slots_one_gpu_per_run_and_cores_split():
    assert plan_slots("auto", ["0", "1", "2"], cores=24) == [Slot(8, "0"), Slot(8, "1"), Slot(8, "2")]
    assert plan_slots(2, ["GPU-aa", "GPU-bb", "GPU-cc"], cores=24) == [Slot(12, "GPU-aa"), Slot(12, "GPU-bb")]
    assert plan_slots(2, [], cores=2) == [Slot(1, None), Slot(1, None)]
    assert plan_slots(3, [], cores=2) == [Slot(1, None)] * 3  # never 0 threads
    assert plan_slots("auto", [], cores=16) == [Slot(16, None)]
    assert Slot(4, "3").env() == {"CUDA_VISIBLE_DEVICES": "3"} and Slot(4, None).env() == {}
    with pytest.raises(ExecutorError, match=r"--jobs 3: only 2 GPU\(s\) visible.*--jobs 2 or --jobs auto"):
        plan_slots(3, ["0", "1"], cores=8)


def test_one_job_is_the_sequential_sweep_of_before():
    made = []
    ex = local_executor([Slot(2, None)], lambda **kw: made.append(kw) or (lambda *a: {}), progress=True)
    assert isinstance(ex, Sequential) and made == [{"progress": True, "echo": True}]
    ex = local_executor([Slot(1, None), Slot(1, None)], lambda **kw: made.append(kw) or (lambda *a: {}), True)
    assert isinstance(ex, LocalPool) and made[1]["threads"] == 1 and made[1]["progress"] is False


class OrderedRunner:
    """A thread-safe fake run whose finishing order the test fixes by events, not by sleeps: the `slow` run (the
    first submitted) ends only once the rows of `slow_after` runs that started after it are on disk (so they ran
    beside it), and every run ends only once the row of the run that ended before it has been written (so no two
    runs finish "together"). Records what ran, in which order runs finished, and how many ran at once."""

    def __init__(self, log: dict, fail_on: str, slow: str, slow_after: int = 3):
        self.log, self.fail_on, self.slow, self.slow_after = log, fail_on, slow, slow_after

    def __call__(self, spec, run_dir: Path, resume: bool) -> dict:
        log = self.log
        with log["lock"]:
            log["started"].append(spec.config_hash)
            log["start"][spec.name] = len(log["started"])
            log["now"] += 1
            log["most"] = max(log["most"], log["now"])
        with log["rows_written"]:
            if spec.name == self.slow:
                mine = log["start"][spec.name]
                later = lambda: sum(log["start"][name] > mine for name in log["rows"]) >= self.slow_after
                assert log["rows_written"].wait_for(later, timeout=FAILURE_BOUND_S)
            # the previous finisher's row first (run_sweep appends a row only after its run has returned)
            previous_recorded = lambda: not log["finished"] or log["finished"][-1] in log["rows"]
            assert log["rows_written"].wait_for(previous_recorded, timeout=FAILURE_BOUND_S)
            log["now"] -= 1
            log["finished"].append(spec.name)
        failed = self.fail_on in spec.cfg.lora.target_modules
        return {
            **dict.fromkeys(RESULT_KEYS),
            "status": "failed" if failed else "ok",
            "error": "ValueError: matched no module" if failed else None,
            "val_ppl": 7.0 - 0.01 * spec.cfg.lora.rank,
            "device": "cpu (fake)",
        }


def test_pool_runs_each_config_once_appends_in_finish_order_and_reuses_after_the_twin(tmp_path, monkeypatch):
    specs = [s for p in DEFAULT_STUDY for s in plan_runs(load_config(p), name=p.stem)]
    cond = threading.Condition()
    log = {"lock": threading.Lock(), "rows_written": cond, "started": [], "finished": [], "rows": [], "now": 0}
    log.update(most=0, start={})

    def append_row(out_dir: Path, row: dict) -> None:  # the sweep's own writer; the runners wait on what it wrote
        real_append_row(out_dir, row)
        with cond:
            if not row["reused_from"]:
                log["rows"].append(f"{row['ablation']}={row['value']}-seed{row['seed']}")
            cond.notify_all()

    monkeypatch.setattr(sweep_module, "append_row", append_row)
    runners = [OrderedRunner(log, fail_on="fc1", slow=specs[0].name) for _ in range(2)]
    with LocalPool(runners, threading.Event()) as pool:
        rows = run_sweep(specs, tmp_path, pool, say=lambda s: None)
    assert log["most"] == 2  # two at once (the slow run beside the others), never more
    assert len(log["started"]) == 11 == len(set(log["started"]))  # the shared baseline trained once
    on_disk = read_rows(tmp_path)
    assert on_disk == rows and len(rows) == 13
    names = [f"{r['ablation']}={r['value']}-seed{r['seed']}" for r in on_disk if not r["reused_from"]]
    assert names == log["finished"] and names.index(specs[0].name) >= 3  # in finishing order; the slow one's late
    baseline = next(i for i, r in enumerate(on_disk) if r["ablation"] == "lora_rank" and r["value"] == 16)
    reused = [i for i, r in enumerate(on_disk) if r["reused_from"]]
    assert len(reused) == 2 and min(reused) > baseline  # a twin's row only once its run has finished
    assert {r["config_hash"] for r in (on_disk[i] for i in reused)} == {on_disk[baseline]["config_hash"]}
    failed = [r for r in on_disk if r["status"] == "failed"]
    assert failed and all("fc1" in r["value"] for r in failed)  # failures recorded, the others ran to the end
    assert plan_states(specs, tmp_path).count("done") == 13 - len(failed)


def test_closing_a_pool_stops_every_child(tmp_path, monkeypatch):
    """Ctrl-C in the sweep closes the pool: each slot interrupts its training process (SIGINT, which the fake run
    records) and waits for it. The fake never ends on its own, so only an interrupt ends it."""
    fake = tmp_path / "fakepkg" / "experiments_forever.py"
    fake.parent.mkdir()
    fake.write_text(
        textwrap.dedent("""
        import os, pathlib, sys, threading
        run_dir = pathlib.Path(sys.argv[sys.argv.index("--run-dir") + 1])
        (run_dir / "argv").write_text(" ".join(sys.argv))
        try:  # before the pid is out: a SIGINT the moment the test sees it must land in here, not before the try
            (run_dir / "pid.tmp").write_text(str(os.getpid()))
            (run_dir / "pid.tmp").rename(run_dir / "pid")  # whole or absent: the test may read it at any moment
            threading.Event().wait()
        except KeyboardInterrupt:
            (run_dir / "interrupted").touch()
            raise
    """)
    )
    monkeypatch.setenv("PYTHONPATH", str(fake.parent))
    specs = plan_runs(load_config(DEFAULT_STUDY[0]), name="r", values=[4, 8])
    stop = threading.Event()
    runners = [subprocess_runner(False, False, "experiments_forever", threads=1, stop=stop) for _ in range(2)]
    pool = LocalPool(runners, stop)
    dirs = [s.run_dir(tmp_path) for s in specs]
    pids: list[int] = []
    try:
        for spec, d in zip(specs, dirs):
            d.mkdir(parents=True)
            pool.submit(spec, d, False)
        wait_until(lambda: all((d / "pid").exists() for d in dirs), "both fake runs started")
        pids = [int((d / "pid").read_text()) for d in dirs]
        assert all(alive(p) for p in pids)
    finally:  # also when an assertion above failed: the fake runs would otherwise wait forever
        closer = threading.Thread(target=pool.close, daemon=True)
        closer.start()
        closer.join(timeout=FAILURE_BOUND_S)  # a bound on a failure only: close() returns once both children end
        for p in pids:
            if alive(p):
                os.kill(p, signal.SIGKILL)
    assert not closer.is_alive(), f"pool.close() did not return within {FAILURE_BOUND_S} s"
    assert not any(alive(p) for p in pids)  # close() waited for its children
    assert all((d / "interrupted").exists() for d in dirs)  # stopped by the SIGINT close() sent, not killed
    assert all("--no-progress --threads 1" in (d / "argv").read_text() for d in dirs)


def test_ray_probe_needs_the_drivers_file_and_a_writable_folder(tmp_path):
    (tmp_path / PROBE_FILE).write_text("token-1")
    check_shared([tmp_path], "token-1")
    assert sorted(p.name for p in tmp_path.iterdir()) == [PROBE_FILE]  # the task's own probe is removed
    with pytest.raises(ExecutorError, match="another sweep's probe file"):
        check_shared([tmp_path], "token-2")
    elsewhere = tmp_path / "node-local"
    elsewhere.mkdir()
    with pytest.raises(ExecutorError, match=r"cannot use .*node-local.*mounts at the same path"):
        check_shared([tmp_path, elsewhere], "token-1")


@pytest.mark.parametrize(
    "argv,env,needle",
    [
        (["--jobs", "0"], {}, "'0': give a number of runs at once (1 or more) or auto"),
        (["--jobs", "two"], {}, "give a number of runs at once"),
        (["--ray-address", "auto"], {}, "--ray-address needs --executor ray"),
        (["--executor", "ray", "--jobs", "2"], {}, "--jobs is for --executor local"),
        (["--jobs", "2"], {"WORLD_SIZE": "2"}, "under torchrun each run is data-parallel"),
    ],
)
def test_executor_flag_errors_fail_fast(argv, env, needle, tmp_path, capsys, monkeypatch):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "out"
    try:
        rc = main([*argv, "--quick", "--out", str(out)])
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    assert rc == 2 and needle in capsys.readouterr().err
    assert not out.exists()
