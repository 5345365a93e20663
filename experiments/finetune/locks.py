"""One owner of a run folder at a time, and training processes that end with the sweep that started them.

The run lock is an `fcntl.flock` on a small file that stays in the run folder (deleting a lock file lets two
processes lock two different files of the same name). The kernel drops a flock when the last descriptor of the
open file is closed, so a process that dies, SIGKILL included, never leaves a stale lock behind. fcntl rather
than the `filelock` package (which guards the results file and pretraining): the lock is shared between a sweep
and its training process, which needs flock's shared mode on descriptors of our own. POSIX only (Linux, macOS).
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

RUN_LOCK = "owner.lock"  # in a run folder: locked by every process working on the run; holds the owner's pid


class RunLock:
    """Ownership of one run folder, held by the sweep that trains the run and by its training process together.

    The sweep `claim`s it: exclusive (no one else holds it in any mode), then downgraded to shared, so that its
    training process can `join` with a shared hold of its own. Another sweep's claim fails while either of them
    lives: it then skips the run, naming `owner()`. flock's downgrade is not atomic; a claim that loses the
    lock in that instant reports failure, so at most one claimant ever proceeds.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / RUN_LOCK
        self._fd: int | None = None

    def claim(self) -> bool:
        """Become the run's owner: True, or False when another process holds the run."""

        def own(fd: int) -> None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)

        return self._hold(own)

    def join(self) -> bool:
        """A shared hold next to the owner that started this process: False when someone else holds the run."""
        return self._hold(lambda fd: fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB))

    def _hold(self, lock: Callable[[int], None]) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            lock(fd)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def owner(self) -> str:
        """The pid written by the run's owner, as text ("?" if none was written). Read under a shared hold, which
        waits out a claimant's exclusive one: a claimant writes its pid before it shares, so a sweep that lost the
        claim a moment ago still reads the winner's pid, never a half-written or empty file."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return "?"
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            return os.read(fd, 64).decode(errors="replace").strip() or "?"
        finally:
            os.close(fd)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def exit_with_parent(parent_pid: int, interval_s: float = 0.5) -> None:
    """End this process (exit code 1) as soon as `parent_pid` is no longer its parent, i.e. when the sweep that
    started it died, even by SIGKILL. A daemon thread polls os.getppid(): portable, and unlike Linux's
    PR_SET_PDEATHSIG not tied to the thread that started the child (a sweep may start runs from worker threads).
    The run lock this process shares keeps the run owned until it is gone, so no second sweep overlaps it."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(interval_s)
        os._exit(1)  # checkpoints are written atomically: the run resumes from its last one

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
