"""How one run of a sweep runs: a Runner takes (spec, run folder, resume?) and returns the run's result.

- subprocess_runner: a fresh `python -m experiments.finetune` process per run (what every executor uses), so a
  run's peak memory is its own and a crash costs one row;
- inprocess_runner: train_run in this process, for torchrun, where every rank trains every run together.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import traceback
from collections import deque
from pathlib import Path

from experiments.finetune.row import read_result
from experiments.sweep.executors import REPO_ROOT, Runner, failed_result
from experiments.sweep.plan import RunSpec


def _tee(stream, log, terminal, tail: deque, muted: threading.Event) -> None:
    """Copy a child's stderr to its log, and to the terminal until `muted` (set on Ctrl-C, so the child's last
    words stay in its train.log), as it comes (progress bars included); keep the tail."""
    for chunk in iter(lambda: os.read(stream.fileno(), 8192), b""):
        tail.append(chunk)
        log.write(chunk)
        log.flush()
        if terminal is not None and not muted.is_set():
            terminal.write(chunk)
            terminal.flush()


def _wait(proc: subprocess.Popen, stop: threading.Event | None) -> int:
    """proc.wait() in short slices: between them a pool closing (`stop` set) or Ray cancelling the task (an
    exception raised in this thread, which a thread blocked in waitpid would only see once the child ends)
    interrupt the run."""
    while True:
        try:
            return proc.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            if stop is not None and stop.is_set():
                raise KeyboardInterrupt from None


def subprocess_runner(
    progress: bool = True,
    echo: bool = True,
    module: str = "experiments.finetune",
    *,
    threads: int | None = None,
    env: dict[str, str] | None = None,
    stop: threading.Event | None = None,
) -> Runner:
    """Each run in a fresh `python -m experiments.finetune` process: its peak memory is its own, and a crash (even a
    segfault or the OOM killer) costs one row, not the sweep. stderr is echoed and kept in run_dir/train.log. The
    child is given this process's pid and ends itself when this process dies (locks.exit_with_parent).

    For runs side by side: `threads` sets the child's torch threads, `env` adds variables (CUDA_VISIBLE_DEVICES),
    and setting `stop` interrupts the child as Ctrl-C would."""

    def run(spec: RunSpec, run_dir: Path, resume: bool) -> dict:
        cmd = [
            sys.executable,
            "-m",
            module,
            "--config-json",
            str(run_dir / "config.json"),
            "--run-dir",
            str(run_dir),
            "--group",
            spec.ablation,
            "--name",
            spec.name,
            "--parent-pid",
            str(os.getpid()),
        ]
        cmd += ["--resume"] if resume else []
        cmd += [] if progress else ["--no-progress"]
        cmd += ["--threads", str(threads)] if threads else []
        child_env = {**os.environ, **(env or {})}
        child_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), child_env.get("PYTHONPATH")) if p)
        tail: deque = deque(maxlen=64)
        muted = threading.Event()
        with open(run_dir / "train.log", "ab") as log:
            proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, env=child_env)
            terminal = sys.stderr.buffer if echo and hasattr(sys.stderr, "buffer") else None
            reader = threading.Thread(target=_tee, args=(proc.stderr, log, terminal, tail, muted), daemon=True)
            reader.start()
            try:
                rc = _wait(proc, stop)
            except BaseException:  # Ctrl-C / SIGTERM: stop the child too (it may not share our terminal)
                muted.set()
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                raise
            reader.join(timeout=10)
        result = read_result(run_dir)
        if result is not None:
            return result
        text = b"".join(tail).decode("utf-8", "replace").replace("\r", "\n")
        lines = [ln for ln in text.splitlines() if ln.strip()][-15:]
        why = (
            f"killed by signal {-rc}" + (" (SIGKILL: often the out-of-memory killer)" if rc == -9 else "")
            if rc < 0
            else f"exit code {rc}"
        )
        return failed_result(f"training process ended without a result ({why}); stderr tail:\n" + "\n".join(lines))

    return run


def inprocess_runner(progress: bool = True) -> Runner:
    """train_run in this process (torchrun: every rank runs every run together)."""

    def run(spec: RunSpec, run_dir: Path, resume: bool) -> dict:
        from experiments.finetune.train import train_run  # torch is imported only when something trains

        try:
            return train_run(
                spec.cfg, run_dir, resume=resume, group=spec.ablation, run_name=spec.name, progress=progress
            )
        except Exception as e:  # train_run reports failures itself; this is the safety net
            return failed_result(f"{type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}")

    return run
