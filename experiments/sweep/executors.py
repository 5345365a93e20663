"""Executors: how many of a sweep's runs train at once, and where. The sweep (experiments.sweep.sweep) decides what runs
and writes every row; an executor only starts runs it is handed and says which one finished.

- Sequential: one run at a time, in the caller's thread (the default, and what torchrun needs).
- LocalPool (`--jobs N`): N runs side by side on this machine, each in its own process, one per slot: each slot
  has its own GPU (CUDA_VISIBLE_DEVICES) or, on CPU, an equal share of the cores (the child's torch threads).
- RayExecutor (`--executor ray`): each run a Ray task on a cluster, one GPU per run when the cluster has GPUs.

Every executor is a context manager: leaving it early (Ctrl-C, SIGTERM, an error) stops every run in flight the
way Ctrl-C stops a single run, so the sweep resumes when run again.
"""

from __future__ import annotations

import argparse
import functools
import os
import socket
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data.cache import ENV_VAR as CACHE_ENV_VAR
from data.cache import cache_dir
from experiments.finetune.row import RESULT_KEYS
from experiments.sweep.plan import RunSpec

# One run: (spec, its run folder, resume from its checkpoint?) -> its result (RESULT_KEYS). Never raises for a
# failed run; only for an interrupt.
Runner = Callable[[RunSpec, Path, bool], dict]

REPO_ROOT = Path(__file__).resolve().parents[2]
PROBE_FILE = ".shared-probe"  # in --out and the cache while a Ray sweep runs: proof that a node sees them
# A Ray address must accept a TCP connection within this time; ray.init would retry one with nothing behind it
# forever. A reachable host answers (or refuses) in milliseconds, so this only bounds an unreachable one.
RAY_CONNECT_TIMEOUT_S = 10.0


class ExecutorError(RuntimeError):
    """A sweep cannot be run the way it was asked (more jobs than GPUs, no Ray, a folder a node cannot see)."""


def failed_result(error: str) -> dict:
    return {**dict.fromkeys(RESULT_KEYS), "status": "failed", "error": error}


class Executor(ABC):
    """Runs handed over by `submit` while `free()`; `next_done` blocks until one has finished and returns it."""

    parallel = False  # several runs at once: children show no progress bars of their own

    @abstractmethod
    def free(self) -> bool: ...

    @abstractmethod
    def submit(self, spec: RunSpec, run_dir: Path, resume: bool) -> None: ...

    @abstractmethod
    def next_done(self) -> tuple[RunSpec, dict]: ...

    @abstractmethod
    def close(self) -> None:
        """Stop whatever is still in flight (nothing is, after a sweep that ran to its end)."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Sequential(Executor):
    """One run at a time, in this thread: `next_done` runs the run `submit` took."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self._job: tuple[RunSpec, Path, bool] | None = None

    def free(self) -> bool:
        return self._job is None

    def submit(self, spec: RunSpec, run_dir: Path, resume: bool) -> None:
        self._job = (spec, run_dir, resume)

    def next_done(self) -> tuple[RunSpec, dict]:
        assert self._job is not None, "next_done before submit"
        spec, run_dir, resume = self._job
        self._job = None
        return spec, self.runner(spec, run_dir, resume)

    def close(self) -> None:
        """Nothing to stop: a run only runs inside `next_done`, where Ctrl-C reaches its runner directly."""


class LocalPool(Executor):
    """One thread per slot, each waiting on its run's process; slot i always runs with runners[i] (its GPU, its
    threads). `stop` is the event the runners watch: closing the pool sets it, and each runner interrupts its
    child and waits for it, so no training process outlives the sweep."""

    parallel = True

    def __init__(self, runners: Sequence[Runner], stop: threading.Event) -> None:
        self._runners = list(runners)
        self._stop = stop
        self._pool = ThreadPoolExecutor(max_workers=len(self._runners), thread_name_prefix="run")
        self._free = list(range(len(self._runners)))[::-1]  # pop() hands out slot 0 first
        self._futures: dict[Future, tuple[RunSpec, int]] = {}

    def free(self) -> bool:
        return bool(self._free)

    def submit(self, spec: RunSpec, run_dir: Path, resume: bool) -> None:
        slot = self._free.pop()
        self._futures[self._pool.submit(self._runners[slot], spec, run_dir, resume)] = (spec, slot)

    def next_done(self) -> tuple[RunSpec, dict]:
        done, _ = wait(self._futures, return_when=FIRST_COMPLETED)
        future = next(iter(done))
        spec, slot = self._futures.pop(future)
        self._free.append(slot)
        return spec, future.result()

    def close(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------- slots on one machine


@dataclass(frozen=True)
class Slot:
    """What one of N side-by-side runs gets: torch threads, and a GPU (an entry of CUDA_VISIBLE_DEVICES) or none."""

    threads: int
    gpu: str | None

    def env(self) -> dict[str, str]:
        return {"CUDA_VISIBLE_DEVICES": self.gpu} if self.gpu is not None else {}


def parse_jobs(text: str) -> int | str:
    """--jobs: a number of runs at once, or "auto"."""
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of runs at once (1 or more) or auto")
    return int(text)


def given(text: str) -> str:
    """A flag's value that must say something: an empty one (`--lr-grid ""`, `--data "$UNSET"`) is a mistake, never
    a silent default."""
    if not text.strip(" ,"):
        raise argparse.ArgumentTypeError(f"{text!r} is empty; give a value or leave the flag out")
    return text


def add_executor_flags(ap: argparse.ArgumentParser) -> None:
    """--jobs, --executor and --ray-address, checked by `check_executor_flags`, used by `executor_from_flags`."""
    ap.add_argument(
        "--jobs",
        type=parse_jobs,
        default=1,
        metavar="N",
        help="runs at once on this machine, each its own process: one GPU each (auto: one per GPU), "
        "or on CPU an equal share of the cores (auto: 1)",
    )
    ap.add_argument(
        "--executor",
        choices=("local", "ray"),
        default="local",
        help="ray: each run a Ray task on a cluster (--out and the cache on a filesystem every node sees)",
    )
    ap.add_argument(
        "--ray-address",
        "--ray_address",
        dest="ray_address",
        type=given,
        metavar="ADDR",
        help="the Ray cluster to join (auto, or ray://HOST:10001); default: $RAY_ADDRESS, else a local Ray",
    )


def check_executor_flags(jobs: int | str, executor: str, ray_address: str | None, world: int) -> None:
    """--jobs, --executor ray and torchrun each decide how runs share the devices: at most one of them may."""
    if ray_address and executor != "ray":
        raise ExecutorError("--ray-address needs --executor ray.")
    if executor == "ray" and jobs != 1:
        raise ExecutorError("--jobs is for --executor local; with Ray, the cluster's GPUs (or CPUs) set how many run.")
    if world > 1 and (jobs != 1 or executor != "local"):
        raise ExecutorError(
            "under torchrun each run is data-parallel over the torchrun processes; --jobs and --executor ray run "
            "several runs at once instead: use one or the other."
        )
    if executor == "ray":
        check_ray_address(ray_address)


def cpu_cores() -> int:
    """The cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def visible_gpus() -> list[str]:
    """The GPUs torch sees, as CUDA_VISIBLE_DEVICES entries a child can be given (indices or UUIDs)."""
    import torch

    n = torch.cuda.device_count()
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return listed[:n] if listed else [str(i) for i in range(n)]


def plan_slots(jobs: int | str, gpus: Sequence[str], cores: int) -> list[Slot]:
    """`--jobs N` (or "auto") as slots. With GPUs: one GPU per run, auto = one run per GPU; a GPU is never
    shared, since two runs on one would each report the other's load in their tokens/s. On CPU: auto = 1, and N
    runs split the cores evenly (at least one thread each)."""
    n = (len(gpus) or 1) if jobs == "auto" else int(jobs)
    if gpus and n > len(gpus):
        raise ExecutorError(
            f"--jobs {jobs}: only {len(gpus)} GPU(s) visible and each run needs its own; "
            f"use --jobs {len(gpus)} or --jobs auto (or --set train.device=cpu to run on CPU)."
        )
    return [Slot(threads=max(1, cores // n), gpu=gpus[i] if gpus else None) for i in range(n)]


def local_executor(slots: Sequence[Slot], make_runner: Callable[..., Runner], progress: bool) -> Executor:
    """One slot: the sweep as it always ran (the child's own progress bar and stderr on the terminal, all cores
    and GPUs). Several: a LocalPool whose children stay quiet (stderr to train.log; the sweep shows one bar)."""
    if len(slots) == 1:
        return Sequential(make_runner(progress=progress, echo=True))
    stop = threading.Event()
    runners = [make_runner(progress=False, echo=False, threads=s.threads, env=s.env(), stop=stop) for s in slots]
    return LocalPool(runners, stop)


def executor_from_flags(
    args: argparse.Namespace,
    pending: Sequence[RunSpec],
    out_dir: Path,
    make_runner: Callable[..., Runner],
    progress: bool,
) -> Executor:
    """The executor --jobs / --executor ask for, for the runs still to train (GPUs count only if one of them may use
    CUDA). `make_runner` is runners.subprocess_runner: each run is its own process wherever it runs."""
    want_gpu = any(s.cfg.train.device != "cpu" for s in pending)
    if args.executor == "ray":
        quiet = functools.partial(make_runner, progress=False, echo=False)
        return RayExecutor(out_dir, quiet, address=args.ray_address, want_gpu=want_gpu)
    return local_executor(plan_slots(args.jobs, visible_gpus() if want_gpu else [], cpu_cores()), make_runner, progress)


# ----------------------------------------------------------------------------- Ray


def check_shared(folders: Sequence[Path], token: str) -> None:
    """On a Ray node: each folder must hold the driver's probe file (the same filesystem) and be writable."""
    host = socket.gethostname()
    for folder in folders:
        probe = Path(folder) / f"{PROBE_FILE}.{host}.{os.getpid()}"
        try:
            seen = (Path(folder) / PROBE_FILE).read_text(encoding="utf-8")
            probe.write_text(token, encoding="utf-8")
            probe.unlink()
            why = "" if seen == token else "it holds another sweep's probe file"
        except OSError as e:
            why = f"{type(e).__name__}: {e}"
        if why:
            raise ExecutorError(
                f"a Ray task on {host} cannot use {folder} ({why}). The results folder (--out) and the cache "
                f"(${CACHE_ENV_VAR}) must be on a filesystem every Ray node mounts at the same path, writable by "
                "the Ray workers."
            )


def _ray_task(
    make_runner: Callable[..., Runner], spec: RunSpec, run_dir: Path, resume: bool, folders: list[Path], token: str
) -> dict:
    """One run on a Ray worker: check the shared folders, then the same subprocess a local sweep starts, with
    as many torch threads as Ray gave the task CPUs."""
    import ray

    check_shared(folders, token)
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    return make_runner(threads=max(1, int(cpus)))(spec, run_dir, resume)


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ExecutorError("--executor ray needs Ray: pip install ray (it is in requirements-dev.txt).") from None
    return ray


def check_ray_address(address: str | None) -> None:
    """The Ray cluster a sweep joins must answer now, before any work: `ray.init` retries an address with nothing
    behind it forever. The address is probed as given; "auto" (and no address at all) as `ray.init` resolves it
    (the cluster `ray start` recorded, if any: without one a local Ray instance is started, which needs no probe)."""
    ray = import_ray()
    given = address or os.environ.get("RAY_ADDRESS") or None
    label = f"--ray-address {address}" if address else f"$RAY_ADDRESS={given}" if given else "the recorded Ray cluster"
    if given in (None, "auto"):
        try:
            target = ray._private.services.canonicalize_bootstrap_address(given)
        except (ConnectionError, ValueError) as e:
            raise ExecutorError(f"{label}: {e}") from None
        if target is None:
            return
    elif given == "local":
        return
    else:
        target = given.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ExecutorError(f"{label}: not HOST:PORT (e.g. 10.0.0.5:6379, ray://10.0.0.5:10001, or auto).")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=RAY_CONNECT_TIMEOUT_S).close()
    except OSError as e:
        why = f"no answer within {RAY_CONNECT_TIMEOUT_S:g} s" if isinstance(e, TimeoutError) else e.strerror or str(e)
        raise ExecutorError(
            f"{label}: no Ray cluster answers at {target} ({why}). Start one there (ray start --head), or give the "
            "address `ray start` printed."
        ) from None


class RayExecutor(Executor):
    """Each run a Ray task (1 GPU when the cluster has GPUs and the runs want CUDA, else 1 CPU); every run is
    submitted at once and Ray places them as resources free up. Connects to `address` ("auto", "ray://host:10001")
    or starts a local Ray instance; one that is already initialized is used as it is.

    The driver keeps writing rows and reading run folders itself, so --out and the cache must be on a filesystem
    the nodes share: the driver leaves a probe file in both, and each task checks it before training."""

    parallel = True

    def __init__(
        self, out_dir: Path, make_runner: Callable[..., Runner], *, address: str | None, want_gpu: bool
    ) -> None:
        ray = self._ray = import_ray()
        self._owns = not ray.is_initialized()
        if self._owns:
            try:
                ray.init(address=address, include_dashboard=False)
            except Exception as e:  # Ray raises bare Exceptions (and ConnectionError) for both
                where = f"the cluster at {address}" if address else "a local Ray instance (or $RAY_ADDRESS)"
                raise ExecutorError(f"Ray did not start or connect to {where}: {e}") from None
        gpus = want_gpu and ray.cluster_resources().get("GPU", 0) > 0
        self._folders = [Path(out_dir).resolve(), cache_dir().resolve()]
        self._token = uuid.uuid4().hex
        for folder in self._folders:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / PROBE_FILE).write_text(self._token, encoding="utf-8")
        env = {"PYTHONPATH": str(REPO_ROOT), CACHE_ENV_VAR: str(self._folders[1])}
        self._task = ray.remote(_ray_task).options(
            num_cpus=1, num_gpus=1 if gpus else 0, max_retries=0, runtime_env={"env_vars": env}
        )
        self._make_runner = make_runner
        self._refs: dict[Any, RunSpec] = {}

    def free(self) -> bool:
        return True

    def submit(self, spec: RunSpec, run_dir: Path, resume: bool) -> None:
        ref = self._task.remote(self._make_runner, spec, Path(run_dir).resolve(), resume, self._folders, self._token)
        self._refs[ref] = spec

    def next_done(self) -> tuple[RunSpec, dict]:
        ready: list = []
        while not ready:  # short waits, so Ctrl-C reaches this thread between them
            ready, _ = self._ray.wait(list(self._refs), num_returns=1, timeout=1.0)
        spec = self._refs.pop(ready[0])
        try:
            return spec, self._ray.get(ready[0])
        except ExecutorError as e:  # a node without the shared folders: no run can go on
            raise ExecutorError(str(e.args[0]) if e.args else str(e)) from None
        except self._ray.exceptions.RayError as e:  # a worker or node that died costs its run, not the sweep
            return spec, failed_result(f"Ray task failed: {type(e).__name__}: {e}")

    def close(self) -> None:
        refs = list(self._refs)
        for ref in refs:  # a running task gets KeyboardInterrupt and stops its training process like Ctrl-C
            self._ray.cancel(ref)
        if refs:
            self._ray.wait(refs, num_returns=len(refs), timeout=60)
        self._refs.clear()
        for folder in self._folders:
            (folder / PROBE_FILE).unlink(missing_ok=True)
        if self._owns:
            self._ray.shutdown()
