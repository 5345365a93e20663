"""Shared by the tests that start real processes: waiting on events those processes produce (files, pids), never on
sleeps that order them, and reading /proc (Linux) to find a sweep's training processes."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

FAILURE_BOUND_S = 300  # how long a wait may take before the test fails: only reached when the code is broken


def wait_until(ready: Callable[[], bool], what: str, seconds: float = FAILURE_BOUND_S, poll_s: float = 0.02) -> None:
    """Poll for an event the code under test produces (a file written, a process gone). The deadline only bounds a
    failure; on a busy machine the wait is simply longer."""
    deadline = time.monotonic() + seconds
    while not ready():
        assert time.monotonic() < deadline, f"{what}: not within {seconds} s"
        time.sleep(poll_s)


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state, ppid, pgrp, ...), or None when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (a zombie has ended; only its exit status is left)."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def cmdline(pid: int) -> str:
    """The command line of a process, space-separated ("" once it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


def processes_with(text: str) -> list[int]:
    """Pids of live processes whose command line mentions `text`."""
    return [int(d.name) for d in Path("/proc").iterdir() if d.name.isdigit() and text in cmdline(int(d.name))]


def training_children(pid: int) -> list[int]:
    """The live training processes (`python -m experiments.finetune`) a sweep process started: its children that
    run that module, whatever else it may have started meanwhile (git, a tokenizer pool)."""
    return [p for p in processes_with("experiments.finetune") if (_stat(p) or ["", "0"])[1] == str(pid) and alive(p)]


def pending(pid: int, sig: int) -> bool:
    """Whether `sig` has been sent to the process and waits to be taken (as it does while the process is stopped)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    masks = [int(line.split()[1], 16) for line in status.splitlines() if line.startswith(("SigPnd:", "ShdPnd:"))]
    return any(mask >> (sig - 1) & 1 for mask in masks)


def stop(pid: int) -> None:
    """SIGSTOP, then wait until every thread of the process has stopped (the signal takes effect asynchronously):
    from then on its files cannot change under the test. A process that has ended meanwhile counts as stopped."""

    def stopped() -> bool:
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except OSError:
            return True
        states = []
        for task in tasks:
            try:
                states.append((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
            except (OSError, IndexError):
                pass
        return all(s in ("T", "t", "Z", "X") for s in states)

    _signal(pid, signal.SIGSTOP)
    wait_until(stopped, f"process {pid} stopped by SIGSTOP", poll_s=0.001)


def cont(pid: int) -> None:
    """SIGCONT: a stopped process runs on (and takes any signal sent to it while it was stopped)."""
    _signal(pid, signal.SIGCONT)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def release_together(folder: Path, procs: dict[str, subprocess.Popen]) -> None:
    """Start the processes' work at one moment, on events only: each child opens its FIFO go-<me> for reading,
    which is what lets the test's open for writing return; once every child is there, closing the FIFOs gives them
    all EOF at once. A child that dies first fails the test instead of hanging it."""
    writers: dict[str, int] = {}

    def open_all() -> None:
        for me in procs:
            writers[me] = os.open(folder / f"go-{me}", os.O_WRONLY)

    opener = threading.Thread(target=open_all, daemon=True)
    opener.start()
    while opener.is_alive():
        opener.join(timeout=1.0)  # a bound on the wait for a crash, not an ordering: the join returns at the event
        dead = {me: p.returncode for me, p in procs.items() if p.poll() is not None}
        if dead and opener.is_alive():
            for me in procs:  # unblock the opener (a reader of our own), then fail
                os.close(os.open(folder / f"go-{me}", os.O_RDONLY | os.O_NONBLOCK))
            raise AssertionError(f"a sweep ended before it was released: {dead}")
    for fd in writers.values():
        os.close(fd)
