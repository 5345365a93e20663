"""Executors without training: how --jobs becomes slots, a pool's order and reuse, stopping children, the Ray
probe, and the flags. Fake runners stand in for training; tests/test_run_e2e.py runs the real thing."""

from __future__ import annotations

import os
import random
import textwrap
import threading
import time
from pathlib import Path

import pytest

from experiments.config.config import load_config
from experiments.finetune.row import RESULT_KEYS
from experiments.run import DEFAULT_STUDY, main
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


class SlowRunner:
    """A thread-safe fake run that takes a random few milliseconds (`slow` ones 0.3 s); records what ran, in which
    order runs finished, and how many ran at once."""

    def __init__(self, log: dict, fail_on: str, slow: str):
        self.log, self.fail_on, self.slow = log, fail_on, slow

    def __call__(self, spec, run_dir: Path, resume: bool) -> dict:
        with self.log["lock"]:
            self.log["started"].append(spec.config_hash)
            self.log["now"] += 1
            self.log["most"] = max(self.log["most"], self.log["now"])
        time.sleep(0.3 if spec.name == self.slow else random.uniform(0.01, 0.04))
        with self.log["lock"]:
            self.log["now"] -= 1
            self.log["finished"].append(spec.name)
        failed = self.fail_on in spec.cfg.lora.target_modules
        return {
            **dict.fromkeys(RESULT_KEYS),
            "status": "failed" if failed else "ok",
            "error": "ValueError: matched no module" if failed else None,
            "val_ppl": 7.0 - 0.01 * spec.cfg.lora.rank,
            "device": "cpu (fake)",
        }


def test_pool_runs_each_config_once_appends_in_finish_order_and_reuses_after_the_twin(tmp_path):
    random.seed(3)
    specs = [s for p in DEFAULT_STUDY for s in plan_runs(load_config(p), name=p.stem)]
    log = {"lock": threading.Lock(), "started": [], "finished": [], "now": 0, "most": 0}
    runners = [SlowRunner(log, fail_on="fc1", slow=specs[0].name) for _ in range(2)]
    with LocalPool(runners, threading.Event()) as pool:
        rows = run_sweep(specs, tmp_path, pool, say=lambda s: None)
    assert log["most"] == 2  # two at once, never more
    assert len(log["started"]) == 11 == len(set(log["started"]))  # the shared baseline trained once
    on_disk = read_rows(tmp_path)
    assert on_disk == rows and len(rows) == 13
    names = [f"{r['ablation']}={r['value']}-seed{r['seed']}" for r in on_disk if not r["reused_from"]]
    assert names[0] != specs[0].name  # the slow first run's row comes when it finishes, not first
    for i, name in enumerate(names):  # in the order runs finished (two that finish together may swap)
        assert abs(log["finished"].index(name) - i) <= 1, (names, log["finished"])
    baseline = next(i for i, r in enumerate(on_disk) if r["ablation"] == "lora_rank" and r["value"] == 16)
    reused = [i for i, r in enumerate(on_disk) if r["reused_from"]]
    assert len(reused) == 2 and min(reused) > baseline  # a twin's row only once its run has finished
    assert {r["config_hash"] for r in (on_disk[i] for i in reused)} == {on_disk[baseline]["config_hash"]}
    failed = [r for r in on_disk if r["status"] == "failed"]
    assert failed and all("fc1" in r["value"] for r in failed)  # failures recorded, the others ran to the end
    assert plan_states(specs, tmp_path).count("done") == 13 - len(failed)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_closing_a_pool_stops_every_child(tmp_path, monkeypatch):
    """Ctrl-C in the sweep closes the pool: each slot interrupts its training process and waits for it."""
    fake = tmp_path / "fakepkg" / "experiments_forever.py"
    fake.parent.mkdir()
    fake.write_text(
        textwrap.dedent("""
        import os, pathlib, sys, time
        run_dir = pathlib.Path(sys.argv[sys.argv.index("--run-dir") + 1])
        (run_dir / "argv").write_text(" ".join(sys.argv))
        (run_dir / "pid.tmp").write_text(str(os.getpid()))
        (run_dir / "pid.tmp").rename(run_dir / "pid")  # whole or absent: the test may read it at any moment
        time.sleep(600)
    """)
    )
    monkeypatch.setenv("PYTHONPATH", str(fake.parent))
    specs = plan_runs(load_config(DEFAULT_STUDY[0]), name="r", values=[4, 8])
    stop = threading.Event()
    runners = [subprocess_runner(False, False, "experiments_forever", threads=1, stop=stop) for _ in range(2)]
    pool = LocalPool(runners, stop)
    dirs = [s.run_dir(tmp_path) for s in specs]
    try:
        for spec, d in zip(specs, dirs):
            d.mkdir(parents=True)
            pool.submit(spec, d, False)
        deadline = time.time() + 60
        while not all((d / "pid").exists() for d in dirs):
            assert time.time() < deadline
            time.sleep(0.05)
        pids = [int((d / "pid").read_text()) for d in dirs]
        assert all(_alive(p) for p in pids)
        t0 = time.time()
    finally:
        pool.close()  # also when an assertion above failed: the fake runs would otherwise sleep on for 10 minutes
    assert not any(_alive(p) for p in pids) and time.time() - t0 < 20
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
