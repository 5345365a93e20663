"""A sweep: running the runs an ablation asks for (planned in experiments.sweep.plan) that are not done yet.

Nothing here trains; a `Runner` does (experiments.sweep.runners: a fresh `python -m experiments.finetune` process per
run, or `train_run` in this process under torchrun), handed its runs by an executor (experiments.sweep.executors: one
at a time, N at once, or a Ray cluster). The sweep's own job is never to lose work, however many runs are in flight:

- a run's identity is its config hash, and its folder is RUN_DIR/runs/<hash>/, so a re-run finds its own files;
- a run with an `ok` row for this ablation is skipped; one whose identical config already finished `ok` (the
  three ablations share their baseline) is copied, not re-run;
- a run killed mid-way resumes from run_dir/checkpoint.pt; a run that fails is recorded and the sweep goes on;
- a run folder has one owner at a time (experiments.finetune.locks.RunLock): a run another process is training is
  skipped with a message naming its pid, and a run that process finished meanwhile is not trained again;
- a full disk stops the sweep once what can be recorded is (the run's result.json, or its row);
- rows are appended by this process alone, as runs finish, and a run whose identical config is in flight waits
  for that run's result instead of training it twice.
"""

from __future__ import annotations

import dataclasses
import errno
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from data.cache import write_json_atomic
from experiments.finetune.locks import RunLock
from experiments.finetune.row import RESULT_FILE, RESULT_KEYS, read_result
from experiments.sweep.executors import Executor, Runner, Sequential, failed_result
from experiments.sweep.plan import RunSpec, plan_states
from experiments.sweep.results import append_row, latest, make_row, read_rows, value_label
from training.checkpoint import CHECKPOINT_FILE


def spec_row(
    spec: RunSpec, out_dir: Path, result: dict, reused_from: str | None = None, concurrency: int | None = None
) -> dict:
    """The results row of `spec`'s run, whose folder is spec.run_dir(out_dir)."""
    who = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}  # ablation, value, seed, hashes, cfg
    run_dir = str(spec.run_dir(out_dir).relative_to(out_dir))
    return make_row(**who, result=result, run_dir=run_dir, reused_from=reused_from, concurrency=concurrency)


def _original_concurrency(spec: RunSpec, out_dir: Path) -> int | None:
    """A copied row's train time was measured by the run it copies: that run's row says under what concurrency."""
    rows = read_rows(out_dir)
    return next((r.get("concurrency") for r in reversed(rows) if r["config_hash"] == spec.config_hash), None)


def _reused_result(spec: RunSpec, out_dir: Path) -> tuple[dict, str]:
    """The result of an identical config that already ran: its result.json, else its row."""
    run_dir = spec.run_dir(out_dir)
    result = read_result(run_dir)
    if result is not None:
        return result, str(run_dir.relative_to(out_dir))
    for r in reversed(read_rows(out_dir)):
        if r["config_hash"] == spec.config_hash and r["status"] == "ok":
            return {k: r.get(k) for k in RESULT_KEYS}, f"{r['ablation']} row"
    return failed_result("the identical config this run was to reuse left no result"), ""


def _claim(spec: RunSpec, out_dir: Path, lock: RunLock) -> str:
    """Take the run's folder, then look again at what is done: "busy <pid>" (another process holds the run),
    "done" / "reuse" (another process finished it since the plan was made), or "train"."""
    if not lock.claim():
        return f"busy {lock.owner()}"
    row = latest(read_rows(out_dir)).get((spec.ablation, spec.config_hash))
    if row is not None and row["status"] == "ok":
        return "done"
    result = read_result(spec.run_dir(out_dir))
    return "reuse" if result is not None and result.get("status") == "ok" else "train"


def _stop_if_disk_full(result: dict, run_dir: Path) -> None:
    """A run that failed on a full disk stops the sweep: every later run would fail the same way."""
    if f"[Errno {errno.ENOSPC}]" in str(result.get("error") or ""):
        raise OSError(errno.ENOSPC, "No space left on device (the training process ran out)", str(run_dir))


def run_sweep(
    specs: Sequence[RunSpec],
    out_dir: Path,
    runner: Runner | Executor,
    *,
    is_main: bool = True,
    states: Sequence[str] | None = None,
    say: Callable[[str], None] = print,
    share: Callable[[Any], Any] = lambda decision: decision,
    progress: bool = False,
) -> list[dict]:
    """Run every spec not done yet, in order, as many at once as the executor takes (a plain Runner: one at a
    time); append a row per finished run, in the order they finish (rank 0 only). Returns the new rows.

    The caller owns the executor (`with executor: run_sweep(...)`): closing it stops what is still in flight.
    `progress` shows one bar over the whole sweep, naming the runs in flight, when the executor runs several at
    once (a single run shows its own bar). Under torchrun every rank calls this with the same specs and the same
    `states` (rank 0's plan_states, sent to all), so all take the same decisions; `share` sends rank 0's decision
    about each run to every rank.
    """
    out_dir = Path(out_dir)
    executor = runner if isinstance(runner, Executor) else Sequential(runner)
    states = list(states) if states is not None else plan_states(specs, out_dir)
    todo = sum(s != "done" for s in states)
    if is_main:
        say(f"{len(specs)} runs, {len(specs) - todo} already done, {todo} to go; results in {out_dir}")
    queue = deque((spec, state) for spec, state in zip(specs, states) if state != "done")
    in_flight: dict[str, tuple[RunSpec, RunLock]] = {}  # config hash -> the run training it, and its folder's lock
    waiting: dict[str, list[RunSpec]] = {}  # config hash in flight -> identical configs that reuse its result
    busy: set[str] = set()  # config hashes another process is training
    peak: dict[str, int] = {}  # config hash in flight -> the most runs in flight at once while it trained
    new_rows: list[dict] = []
    started = iter(range(1, todo + 1))
    use_bar = progress and is_main and executor.parallel  # one run at a time shows its own bar instead
    bar = tqdm(total=todo, desc="sweep", unit="run", dynamic_ncols=True, disable=not use_bar)
    show = bar.write if use_bar else say

    def record(spec: RunSpec, result: dict, reused_from: str | None = None, concurrency: int | None = None) -> None:
        new_rows.append(spec_row(spec, out_dir, result, reused_from=reused_from, concurrency=concurrency))
        append_row(out_dir, new_rows[-1])
        bar.update()

    def reuse(spec: RunSpec) -> None:
        result, source = _reused_result(spec, out_dir)
        record(spec, result, reused_from=source, concurrency=_original_concurrency(spec, out_dir))
        show(f"    {spec.name}: {result.get('status')}: identical config already ran ({source}); row copied")

    def start(spec: RunSpec, state: str) -> None:
        run_dir = spec.run_dir(out_dir)
        if is_main:
            show(
                f"[{next(started)}/{todo}] {spec.ablation}: {spec.key}={value_label(spec.value)} seed={spec.seed} "
                f"({state}, {run_dir.relative_to(out_dir)})"
            )
        if state == "reuse" and spec.config_hash not in busy:
            if spec.config_hash in in_flight:
                waiting.setdefault(spec.config_hash, []).append(spec)
            elif is_main:
                reuse(spec)
            return
        lock = RunLock(run_dir)
        if is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
        action = share(_claim(spec, out_dir, lock) if is_main else None)
        if action != "train":
            lock.release()
            if action.startswith("busy"):
                busy.add(spec.config_hash)
                if is_main:
                    show(f"    {spec.name}: being trained by another process (pid {action.split()[1]}); skipped")
            elif action == "done" and is_main:
                show(f"    {spec.name}: finished by another process meanwhile; skipped")
            elif action == "reuse" and is_main:
                reuse(spec)
            return
        if is_main:
            write_json_atomic(run_dir / "config.json", spec.cfg.to_dict())
            (run_dir / RESULT_FILE).unlink(missing_ok=True)  # a stale failure must not stand in for this attempt
        executor.submit(spec, run_dir, (run_dir / CHECKPOINT_FILE).exists())
        in_flight[spec.config_hash] = (spec, lock)
        for h in in_flight:  # each run in flight has shared the machine with this many at once (itself included)
            peak[h] = max(peak.get(h, 1), len(in_flight))
        bar.set_postfix_str(", ".join(s.name for s, _ in in_flight.values()))

    def finish(spec: RunSpec, result: dict) -> None:
        _, lock = in_flight.pop(spec.config_hash)
        bar.set_postfix_str(", ".join(s.name for s, _ in in_flight.values()), refresh=False)
        try:  # the folder stays ours until its result and row are written: no other sweep trains it again
            if not is_main:
                return
            run_dir = spec.run_dir(out_dir)
            if read_result(run_dir) is None:
                write_json_atomic(run_dir / RESULT_FILE, result)
            record(spec, result, concurrency=peak.pop(spec.config_hash))
            log = run_dir / "train.log"
            where = f" (log: {log.relative_to(out_dir)})" if result.get("status") != "ok" and log.exists() else ""
            show(f"    {spec.name}: {_one_line(result)}{where}")
            _stop_if_disk_full(result, run_dir)
        finally:
            lock.release()
        for twin in waiting.pop(spec.config_hash, []):
            reuse(twin)

    try:
        with bar:
            while queue or in_flight:
                while queue and (queue[0][1] == "reuse" or executor.free()):
                    start(*queue.popleft())
                if in_flight:
                    finish(*executor.next_done())
    finally:  # leaving early: the runs' own processes hold their folders until the executor has stopped them
        for _, lock in in_flight.values():
            lock.release()
    if busy and is_main:
        say(f"{len(busy)} run(s) skipped: another process is training them; run this command again once it is done.")
    return new_rows


def _one_line(r: dict) -> str:
    if r.get("status") != "ok":
        err = (r.get("error") or "").strip().splitlines()
        extra = f" at step {r['diverged_step']}" if r.get("diverged_step") else ""
        return f"{r.get('status')}{extra}: {err[0] if err else ''}"
    ppl, base = r.get("val_ppl"), r.get("base_val_ppl")
    tps = r.get("tokens_per_s")
    return (
        f"ok: val ppl {ppl:.3f}"
        + (f" (base {base:.3f})" if base else "")
        + f", {r.get('train_time_s') or 0:.1f} s"
        + (f", {tps:,.0f} tok/s" if tps else "")
    )
