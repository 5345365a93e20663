"""End to end, as a user runs it: `python -m experiments.run --quick ...` in a subprocess, with the real training
process per run, on tiny corpora (a few stdlib files) and a private cache (SLM_LORA_CACHE) so nothing is shared
with the user's cache and nothing big is tokenized.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from proc_helpers import FAILURE_BOUND_S, cmdline, cont, pending, processes_with, stop, training_children, wait_until

from training.checkpoint import CHECKPOINT_FILE

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # every test here runs whole sweeps in subprocesses


@pytest.fixture(scope="module")
def env(tmp_path_factory, stdlib_workspace):
    """Two small corpora of stdlib modules and a cache dir shared by this file's tests (the tiny base is
    pretrained once)."""
    root = tmp_path_factory.mktemp("e2e")
    return root, stdlib_workspace(root)


def tiny(root: Path, out: Path) -> list[str]:
    """--quick, shrunk further: a 4-step base, 2-step runs, 1k validation tokens."""
    return [
        "--quick",
        "--no-progress",
        "--out",
        str(out),
        "--data",
        str(root / "finetune"),
        "--set",
        f"pretrain.corpus={root / 'pretrain'}",
        "--set",
        "pretrain.tokens=16384",
        "--set",
        "train.tokens=4096",
        "--set",
        "eval.max_tokens=1024",
        "--set",
        "data.val_fraction=0.25",
    ]


def ranks_2_and_4(root: Path, out: Path, *sets: str) -> list[str]:
    """The rank ablation over ranks 2 and 4 (baseline 2) at the tiny settings, plus `--set` for each of `sets`."""
    extra = [arg for kv in sets for arg in ("--set", kv)]
    return [
        "--config",
        str(REPO / "experiments/configs/abl_lora_rank.yaml"),
        *tiny(root, out),
        *("--set", "ablation.values=[2, 4]", "--set", "ablation.baseline=2"),
        *extra,
    ]


def sweep(args: list[str], env: dict, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "experiments.run", *args],
        env=env,
        cwd=REPO,
        text=True,
        capture_output=True,
        timeout=600,
        **kw,
    )


def rows(out: Path) -> list[dict]:
    path = out / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_quick_sweep_failure_report_and_rerun(env, tmp_path):
    root, e = env
    # A value that passes every check before the runs but cannot train (its loss overflows) sits between two good
    # ones. (A mistake the sweep can know beforehand, such as a module name that matches nothing, now stops it
    # before any work: tests/test_robust_preflight.py.)
    cfg = tmp_path / "abl_lr.yaml"
    cfg.write_text(
        textwrap.dedent("""
        ablation:
          name: lr
          key: train.lr
          values: [0.01, 1.0e+30, 0.005]
          baseline: 0.01
    """)
    )
    out = tmp_path / "out"
    first = sweep(["--config", str(cfg), *tiny(root, out)], e)
    assert first.returncode == 1, first.stderr[-3000:]  # 1: a run diverged (the sweep itself completed)
    assert "1 run(s) did not end ok (1 diverged)" in first.stderr
    got = rows(out)
    assert [(r["value"], r["status"]) for r in got] == [(0.01, "ok"), (1e30, "diverged"), (0.005, "ok")]
    bad = got[1]
    assert bad["diverged_step"] >= 1 and bad["val_ppl"] is None
    assert not (out / bad["run_dir"] / "checkpoint.pt").exists()  # a retry starts fresh
    for r in (got[0], got[2]):
        assert r["val_ppl"] > 1 and r["val_ppl"] == pytest.approx(2.718281828 ** r["val_loss"], rel=1e-6)
        assert r["train_tokens"] == got[0]["train_tokens"] == 4096  # same budget for every value
        assert r["peak_rss_bytes"] > 0 and r["peak_memory_bytes"] == r["peak_rss_bytes"]
        assert r["saved_for_backward_bytes"] > 0 and 0 < r["trainable_params"] < r["total_params"]
        assert r["config_hash"] and r["corpus_fingerprint"] and r["device"].startswith("cpu")
        assert r["git_commit"] and r["torch_version"]
    assert got[0]["trainable_params"] == got[2]["trainable_params"]  # same modules, another learning rate
    assert got[0]["base_val_ppl"] == pytest.approx(got[2]["base_val_ppl"])  # the same validation tokens
    # Summary tables in the terminal; report and plots on disk.
    assert "== lr (train.lr)" in first.stdout and "| **0.01** |" in first.stdout
    report = (out / "report.md").read_text()
    assert "## lr" in report and "diverged" in report
    assert (out / "results.csv").read_text().count("\n") == 4
    for png in ("lr.png", "ppl_vs_params.png"):
        assert (out / "plots" / png).read_bytes()[:4] == b"\x89PNG"
    ok_result = out / got[0]["run_dir"] / "result.json"
    stamp = ok_result.stat().st_mtime_ns

    # The same command again: the two ok runs are skipped, the diverged one is tried again.
    second = sweep(["--config", str(cfg), *tiny(root, out)], e)
    assert "3 runs, 2 already done, 1 to go" in second.stdout
    assert len(rows(out)) == 4 and rows(out)[-1]["value"] == 1e30
    assert ok_result.stat().st_mtime_ns == stamp


# Runs of 64 steps of 2,048 tokens, a checkpoint after each: a window of 63 steps in which a test can catch a run
# mid-way (and hold it there, see `sweep_holding_runs_mid_way`).
LONG_RUN, LONG_STEPS = "train.tokens=131072", 64


def _run_dir_of(pid: int) -> Path | None:
    """The --run-dir of a training process (None once it has ended)."""
    argv = cmdline(pid).split()
    return Path(argv[argv.index("--run-dir") + 1]) if "--run-dir" in argv else None


def sweep_holding_runs_mid_way(args: list[str], env: dict, out: Path, n: int) -> tuple[subprocess.Popen, list[int]]:
    """A sweep in its own process group, returned once `n` of its training processes are held mid-way. Each poll
    stops (SIGSTOP) every training process not held yet and looks at its run folder while it cannot change: one
    with a checkpoint and no adapter yet (a finished run saves its adapter, then drops its checkpoint) stays
    stopped, the others continue. Held runs cannot finish, so the test sees n runs in flight however the machine
    schedules them. Returns the sweep and the held pids; the caller signals them, then continues them (cont)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "experiments.run", *args],
        env=env,
        cwd=REPO,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    held: list[int] = []

    def hold_new() -> bool:
        for pid in training_children(proc.pid):
            if pid in held:
                continue
            stop(pid)
            run_dir = _run_dir_of(pid)
            if run_dir is not None and (run_dir / CHECKPOINT_FILE).exists() and not (run_dir / "adapter").exists():
                held.append(pid)
            else:
                cont(pid)
        finished = [d.parent.name for d in out.glob("runs/*/adapter")]
        assert not finished, f"run(s) {finished} ended before a poll saw them mid-way (a 63-step window)"
        return len(held) >= n or proc.poll() is not None

    try:
        wait_until(hold_new, f"{n} run(s) mid-way")
        assert proc.poll() is None, proc.stdout.read()[-3000:]
    except BaseException:
        for pid in held:
            cont(pid)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    return proc, held


def test_killed_sweep_resumes(env, tmp_path):
    root, e = env
    out = tmp_path / "out"
    args = ranks_2_and_4(root, out, LONG_RUN, "train.checkpoint_every=1")
    proc, held = sweep_holding_runs_mid_way(args, e, out, 1)  # the first run is mid-way
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the sweep and its training process
    for pid in held:
        cont(pid)  # the held run takes the SIGINT sent while it was stopped
    text = proc.communicate(timeout=FAILURE_BOUND_S)[0]
    assert proc.returncode == 130, text[-3000:]
    assert "re-run the same command to resume" in text
    assert rows(out) == []

    plan = sweep([*args, "--dry-run"], e)
    states = [ln.split()[6] for ln in plan.stdout.splitlines() if ln.startswith("lora_rank ")]  # after the lr column
    assert states == ["resume", "run"]

    done = sweep(args, e)
    assert done.returncode == 0, done.stderr[-3000:]
    got = rows(out)
    assert [(r["value"], r["status"], r["steps"]) for r in got] == [(2, "ok", LONG_STEPS), (4, "ok", LONG_STEPS)]
    assert not list(out.glob("runs/*/checkpoint.pt"))  # finished runs drop their checkpoint


def test_torchrun_sweep_runs_values_in_one_process_group(env, tmp_path):
    """torchrun: every rank trains every value together (gloo on CPU); only rank 0 writes rows and the report."""
    root, e = env
    out = tmp_path / "out"
    args = ranks_2_and_4(root, out)
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "experiments.run",
    ]
    done = subprocess.run(
        [*torchrun, *args], env=dict(e, OMP_NUM_THREADS="1"), cwd=REPO, text=True, capture_output=True, timeout=600
    )
    assert done.returncode == 0, done.stderr.replace("\r", "\n")[-8000:]
    got = rows(out)
    assert [(r["value"], r["status"], r["world_size"]) for r in got] == [(2, "ok", 2), (4, "ok", 2)]
    assert done.stdout.count("== lora_rank (lora.rank)") == 1  # rank 0 alone prints the summary
    assert (out / "report.md").exists()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: torch.cuda.is_available() is False")
def test_quick_run_on_cuda(env, tmp_path):
    """--quick on the GPU, as bench/gpu_check.sh runs it: base pretraining and runs on CUDA under bf16 autocast,
    each row with the GPU's name and its own allocator peaks (the CPU twin: test_quick_sweep_failure_...)."""
    root, e = env
    out = tmp_path / "out"
    done = sweep(ranks_2_and_4(root, out, "train.device=cuda"), e)
    assert done.returncode == 0, done.stderr[-3000:]
    got = rows(out)
    assert [(r["value"], r["status"]) for r in got] == [(2, "ok"), (4, "ok")]
    for r in got:
        assert r["device"] == torch.cuda.get_device_name(0) and r["dtype"] == "bfloat16 autocast"
        assert 0 < r["peak_allocated_bytes"] <= r["peak_reserved_bytes"] and r["peak_rss_bytes"] is None
        assert r["peak_memory_bytes"] == r["peak_allocated_bytes"] and r["saved_for_backward_bytes"] > 0
        assert r["val_ppl"] > 1 and r["base_val_ppl"] == pytest.approx(got[0]["base_val_ppl"], rel=1e-4)
    assert got[1]["trainable_params"] == 2 * got[0]["trainable_params"]
    assert (out / "report.md").exists()


# ----------------------------------------------------------------------------- several runs at once


def same_fields(r: dict) -> tuple:
    return (r["ablation"], r["value"], r["seed"], r["status"], r["config_hash"], r["train_tokens"], r["steps"])


def test_two_jobs_give_the_rows_of_one(env, tmp_path):
    """--jobs 2 on CPU: the same runs and numbers as one at a time (each with half the cores), and a report."""
    root, e = env
    one = sweep([*ranks_2_and_4(root, tmp_path / "one"), "--jobs", "1"], e)
    two = sweep([*ranks_2_and_4(root, tmp_path / "two"), "--jobs", "2"], e)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    a = sorted(rows(tmp_path / "one"), key=lambda r: r["value"])
    b = sorted(rows(tmp_path / "two"), key=lambda r: r["value"])
    assert [same_fields(r) for r in a] == [same_fields(r) for r in b] and len(a) == 2
    for x, y in zip(a, b):  # fewer threads may add up floats in another order
        for k in ("val_loss", "base_val_loss", "best_val_loss", "trainable_params"):
            assert y[k] == pytest.approx(x[k], rel=1e-4), k
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    assert all(r["device"].endswith(f", {threads} threads)") for r in b)
    assert "== lora_rank (lora.rank)" in two.stdout and "## lora_rank" in (tmp_path / "two/report.md").read_text()


def test_a_failed_run_among_two_jobs_is_recorded_and_the_other_completes(env, tmp_path):
    root, e = env
    cfg = tmp_path / "abl_lr.yaml"  # a learning rate whose loss overflows: it passes every check, then diverges
    cfg.write_text("ablation: {name: lr, key: train.lr, values: [1.0e+30, 0.01], baseline: 0.01}")
    out = tmp_path / "out"
    done = sweep(["--config", str(cfg), *tiny(root, out), "--jobs", "2"], e)
    assert done.returncode == 1, done.stderr[-3000:]  # 1: a run did not end ok, the sweep itself completed
    got = {r["value"]: r for r in rows(out)}
    assert got[1e30]["status"] == "diverged" and got[1e30]["val_ppl"] is None
    assert got[0.01]["status"] == "ok" and got[0.01]["steps"] == 2
    assert "diverged" in done.stdout and "train.log" in done.stdout


def test_ctrl_c_with_two_jobs_in_flight_stops_both_and_a_rerun_finishes(env, tmp_path):
    """SIGINT to the sweep alone (not its process group): it stops both training processes itself."""
    root, e = env
    out = tmp_path / "out"
    args = [*ranks_2_and_4(root, out, LONG_RUN, "train.checkpoint_every=1"), "--jobs", "2"]
    proc, held = sweep_holding_runs_mid_way(args, e, out, 2)  # both runs mid-way, held there
    assert sorted(processes_with(str(out / "runs"))) == sorted(held)  # the two training processes, nothing else
    os.kill(proc.pid, signal.SIGINT)
    wait_until(lambda: all(pending(pid, signal.SIGINT) for pid in held), "the sweep's SIGINT to its runs")
    for pid in held:
        cont(pid)  # each takes the SIGINT its sweep sent it while it was stopped
    text = proc.communicate(timeout=FAILURE_BOUND_S)[0]
    assert proc.returncode == 130 and "re-run the same command to resume" in text, text[-3000:]
    assert processes_with(str(out / "runs")) == [] and rows(out) == []  # none outlived its sweep, none finished
    done = sweep(args, e)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted((r["value"], r["status"], r["steps"]) for r in rows(out)) == [
        (2, "ok", LONG_STEPS),
        (4, "ok", LONG_STEPS),
    ]


# Ray's raylet gives its agents a fixed 15 s to start (ray-project/ray#65983), and every Ray Python process here
# spends ~2.6 s importing jsonschema's rfc3987_syntax (measured with -X importtime on this 2-core Xeon): on a loaded
# machine the agents can miss it, and the sweep stops before any work with "Ray did not start". That is Ray's own
# startup, so the test starts the sweep again (never skips); a sweep that fails any other way fails the test.
RAY_STARTS = 3


def test_ray_executor_runs_a_quick_two_value_sweep(env, tmp_path):
    """A local Ray instance (this machine's cores): each run a task, rows written by the driver, probe cleaned."""
    root, e = env
    out = tmp_path / "out"
    for _ in range(RAY_STARTS):
        done = sweep([*ranks_2_and_4(root, out), "--executor", "ray"], dict(e, RAY_ADDRESS=""))
        if not (done.returncode == 2 and "Ray did not start" in done.stderr):
            break
    assert done.returncode == 0, done.stderr[-5000:]
    got = sorted(rows(out), key=lambda r: r["value"])
    assert [(r["value"], r["status"], r["steps"]) for r in got] == [(2, "ok", 2), (4, "ok", 2)]
    assert all(r["device"].endswith(", 1 threads)") for r in got)  # one Ray CPU per task
    assert not list(out.glob(".shared-probe*")) and (out / "report.md").exists()
