"""One owner per run folder, with real processes (README, "Nothing is lost"): a run another process holds is
skipped and named, two sweeps on one results folder train each run once, a sweep killed by SIGKILL takes its
training process with it, and Ctrl-C prints one line. The last two train for real (a tiny checkpoint folder, no
pretraining)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from proc_helpers import alive, release_together, training_children, wait_until

from experiments import run
from experiments.config.config import load_config
from experiments.report import markdown as report
from experiments.sweep.plan import plan_runs
from experiments.sweep.results import read_rows
from training.checkpoint import CHECKPOINT_FILE

REPO = Path(__file__).resolve().parent.parent
RANK = REPO / "experiments" / "configs" / "abl_lora_rank.yaml"
ENV = dict(os.environ, PYTHONPATH=str(REPO))

HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from experiments.finetune.locks import RunLock
    run_dir = Path(sys.argv[1])
    run_dir.mkdir(parents=True)
    assert RunLock(run_dir).claim()
    print("held", flush=True)
    time.sleep(600)
""")


def test_run_held_by_another_process_is_skipped_and_named(tmp_path, monkeypatch, capsys):
    held = plan_runs(load_config(RANK), name="abl_lora_rank", values=[4])[0].run_dir(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(held)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        trained: list[int] = []
        monkeypatch.setattr(run, "_prepare", lambda *a: None)
        monkeypatch.setattr(report, "write_report", lambda *a, **k: "")
        monkeypatch.setattr(run, "subprocess_runner", lambda **kw: lambda s, d, r: trained.append(s.value) or ok())
        argv = ["--config", str(RANK), "--set", "ablation.values=[4, 8]", "--set", "ablation.baseline=4"]
        argv += ["--out", str(tmp_path)]
        assert run.main(argv) == 3  # not a failure, not done either
        printed = capsys.readouterr()
        assert f"lora_rank=4-seed0: being trained by another process (pid {holder.pid}); skipped" in printed.out
        assert "1 run(s) not done: another process is training them" in printed.err
        assert trained == [8] and [r["value"] for r in read_rows(tmp_path)] == [8]
    finally:
        holder.kill()  # SIGKILL: the kernel drops its lock
        holder.wait()
    assert run.main(argv) == 0 and trained == [8, 4]


def ok() -> dict:
    return {"status": "ok", "val_ppl": 7.0}


SWEEP = textwrap.dedent("""
    import sys
    from pathlib import Path
    from experiments.config.config import load_config
    from experiments.sweep.plan import plan_runs
    from experiments.sweep.sweep import run_sweep
    out, me = Path(sys.argv[1]), sys.argv[2]
    specs = plan_runs(load_config(sys.argv[3]), name="abl_lora_rank")
    open(out / f"go-{me}").read()  # a FIFO: blocks until the test has both sweeps here, then releases them at once
    met = out / "met"  # a flag file, set once a sweep has stepped aside and the runner holding the lock knows it

    def say(text):
        print(text, flush=True)
        if "being trained by another process" in text and not met.exists():
            with open(out / "met.fifo", "w"):  # blocks until the holder's train() listens; closing releases it
                pass
            met.touch()

    def train(spec, run_dir, resume):
        with open(run_dir / "trained.txt", "a") as f:
            f.write(me + "\\n")
        # The first run ends only once a sweep has stepped aside from a run the other holds: both sweeps plan the
        # same first run, so one of them meets the other's lock there, however the two are scheduled.
        if not met.exists():
            open(out / "met.fifo").read()  # EOF once the sweep that stepped aside has said so
            met.touch()
        return {"status": "ok", "val_ppl": 7.0}

    run_sweep(specs, out, train, say=say)
""")


def test_two_sweeps_on_one_results_folder_train_each_run_once(tmp_path):
    for name in ("go-a", "go-b", "met.fifo"):
        os.mkfifo(tmp_path / name)
    procs = {
        me: subprocess.Popen(
            [sys.executable, "-c", SWEEP, str(tmp_path), me, str(RANK)], env=ENV, stdout=subprocess.PIPE, text=True
        )
        for me in ("a", "b")
    }
    try:
        release_together(tmp_path, procs)
        said = {me: p.communicate(timeout=600)[0] for me, p in procs.items()}
    finally:
        for p in procs.values():
            p.kill()
            p.wait()
    assert all(p.returncode == 0 for p in procs.values()), said
    trained = sorted(tmp_path.glob("runs/*/trained.txt"))
    assert len(trained) == 5 and all(len(f.read_text().split()) == 1 for f in trained)  # once each
    assert sorted(r["value"] for r in read_rows(tmp_path)) == [4, 8, 16, 32, 64]  # one row each, none doubled
    skips = {me: said[me].count("being trained by another process") for me in procs}
    assert sum(skips.values()) >= 1, said  # they met, and stepped aside (and said so)
    for me, other in (("a", "b"), ("b", "a")):
        if skips[me]:
            assert f"(pid {procs[other].pid}); skipped" in said[me]


# ----------------------------------------------------------------------------- real training processes


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory, tiny_checkpoint, toy_corpora):
    """argv + env of a real one-run sweep on a tiny checkpoint folder (nothing to pretrain) whose 100,000 short
    steps never end on their own within a test: it stops only when the test stops it."""
    root = tmp_path_factory.mktemp("robust_e2e")
    toy_corpora(root)
    base = tiny_checkpoint(root / "base")
    env = dict(ENV, SLM_LORA_CACHE=str(root / "cache"), OMP_NUM_THREADS="1")  # toy shapes: one thread is faster
    env.pop("WANDB_PROJECT", None)

    def argv(out: Path) -> list[str]:
        sets = {
            "model.max_position_embeddings": 16,
            "train.batch_tokens": 64,
            "train.micro_batch_tokens": 64,
            "train.tokens": 64 * 100_000,
            "train.checkpoint_every": 2,
            "train.log_every": 1,
            "eval.max_tokens": 256,
            "data.val_fraction": 0.2,
        }
        head = [sys.executable, "-m", "experiments.run", "--config", str(RANK), "--lora_rank", "4"]
        head += ["--base_model", str(base), "--data", str(root / "ft"), "--no-progress", "--out", str(out)]
        return head + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]

    return argv, env


def _steps(out: Path) -> list[int]:
    """The steps the run's metrics.jsonl records a training loss for, in file order."""
    files = list(out.glob("runs/*/metrics.jsonl"))
    if not files:
        return []
    lines = files[0].read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines[:-1]) if "train_loss" in r]  # the last may be half-written


def _wait_for_step(out: Path, proc: subprocess.Popen, step: int) -> None:
    """Until the run has logged `step` (its training process is then running), or the sweep ended (a failure)."""
    wait_until(lambda: proc.poll() is not None or max(_steps(out), default=0) >= step, f"step {step} logged")
    assert proc.poll() is None, f"the sweep ended (exit code {proc.returncode}) before step {step}"


def _start(argv: list[str], env: dict, **kw) -> subprocess.Popen:
    """A sweep in its own process group, so a test can stop it and its training process whatever happens."""
    return subprocess.Popen(argv, env=env, cwd=REPO, start_new_session=True, **kw)


def _stop(*procs: subprocess.Popen) -> None:
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the training process through /proc")
def test_killed_sweep_takes_its_training_process_and_a_rerun_trains_alone(tiny_sweep, tmp_path):
    argv, env = tiny_sweep
    out = tmp_path / "out"
    sweep = _start(argv(out), env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rerun = None
    try:
        _wait_for_step(out, sweep, 3)
        (child,) = training_children(sweep.pid)
        sweep.kill()  # SIGKILL to the sweep alone: no handler runs in it, nothing signals its training process
        sweep.wait()
        # It polls its parent every 0.5 s; its own training has ~100,000 steps to go, far longer than the bound.
        wait_until(lambda: not alive(child), "the training process outlived its sweep")
        killed_at = max(_steps(out))  # after the orphan is gone: it may log a few steps in its last half second
        assert killed_at < 100_000 and not list(out.glob("runs/*/result.json"))  # it stopped, it did not finish

        # The same command at once: it resumes the run from its checkpoint and is the only process writing to it.
        rerun = _start(argv(out), env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for_step(out, rerun, killed_at + 3)
        os.killpg(rerun.pid, signal.SIGINT)
        assert rerun.wait(timeout=120) == 130
    finally:
        _stop(sweep, *([rerun] if rerun else []))
    steps = _steps(out)
    assert steps == list(range(1, len(steps) + 1)), steps  # each step once: never two writers, never a restart


@pytest.mark.slow
def test_ctrl_c_shows_one_line(tiny_sweep, tmp_path):
    argv, env = tiny_sweep
    out = tmp_path / "out"
    sweep = _start(argv(out), env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_step(out, sweep, 3)
        os.killpg(sweep.pid, signal.SIGINT)  # Ctrl-C in a terminal: the sweep and its training process both get it
        text = sweep.communicate(timeout=120)[0]
    finally:
        _stop(sweep)
    assert sweep.returncode == 130, text[-3000:]
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
    (line,) = [ln for ln in text.splitlines() if "interrupt" in ln.lower()]
    assert line.startswith("interrupted: finished runs are in") and "re-run the same command to resume" in line


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the training process through /proc")
def test_sigterm_stops_the_sweep_and_its_run_resumably(tiny_sweep, tmp_path):
    """`kill PID` (a scheduler's SIGTERM) to the sweep alone: it stops its training process, says so in one
    line, and the run keeps its checkpoint for the next attempt."""
    argv, env = tiny_sweep
    out = tmp_path / "out"
    sweep = _start(argv(out), env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_step(out, sweep, 3)
        (child,) = training_children(sweep.pid)
        sweep.terminate()
        text = sweep.communicate(timeout=120)[0]
    finally:
        _stop(sweep)
    assert sweep.returncode == 130 and not alive(child), text[-3000:]
    assert "Traceback" not in text and "re-run the same command to resume" in text, text[-3000:]
    assert list(out.glob(f"runs/*/{CHECKPOINT_FILE}"))
