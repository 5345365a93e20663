"""The results file of a sweep: one flat row per finished run, in RUN_DIR/results.jsonl (+ a CSV copy).

Rows are only ever appended, and every write replaces the whole file atomically (temp file + os.replace), so a
sweep killed at any moment leaves either the old file or the new one, never half a row. Appends hold an exclusive
lock (results.jsonl.lock, next to the file) around their read-modify-write, so processes finishing runs at the
same time never drop each other's rows; readers need no lock. A run that is re-run
appends a new row; readers take the latest row per (ablation, config hash). Load in one line with
`pandas.read_json("RUN_DIR/results.jsonl", lines=True)` or `pandas.read_csv("RUN_DIR/results.csv")`.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import typing
from collections.abc import Iterable
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

from filelock import FileLock

from data.cache import atomic_write
from experiments.config.config import Config
from experiments.finetune.row import COLUMNS, RESULT_KEYS, Row, row_problems
from training.metrics import finite_or_none

RESULTS_JSONL = "results.jsonl"
RESULTS_CSV = "results.csv"

RESULTS_LOCK = "results.jsonl.lock"
REPORT_FILE = "report.md"  # written by experiments.report, as are the plots in PLOTS_DIR
PLOTS_DIR = "plots"


def value_label(value: Any) -> Any:
    """A swept value as a flat cell: lists become "q_proj,v_proj"; scalars stay as they are."""
    return ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else value


def device_peak_bytes(result: dict) -> int | None:
    """The one peak-memory figure a row compares across runs: allocator peak on CUDA, process peak RSS on CPU
    (training.memory.memory_peaks fills exactly one of the two)."""
    if result.get("peak_allocated_bytes") is not None:
        return result["peak_allocated_bytes"]
    return result.get("peak_rss_bytes")


@lru_cache(maxsize=1)
def git_commit() -> str:
    """HEAD of the repository this code lives in, or "unknown" (no git, not a checkout)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            text=True,
            capture_output=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def make_row(
    *,
    ablation: str,
    key: str,
    value: Any,
    value_index: int | None,
    is_baseline: bool,
    seed: int,
    cfg: Config,
    config_hash: str,
    study_hash: str,
    result: dict,
    run_dir: str,
    reused_from: str | None = None,
    concurrency: int | None = None,
) -> Row:
    """One flat row: who (ablation, value, seed, hashes), what came out (result), and the knobs worth a column;
    every column of Row, in order."""
    row: dict[str, Any] = {
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "ablation": ablation,
        "key": key,
        "value": value_label(value),
        "value_index": value_index,
        "is_baseline": is_baseline,
        "seed": seed,
        "eval_max_tokens": cfg.eval.max_tokens,
        "base_model": cfg.model.base,
        "lora_rank": cfg.lora.rank,
        "lora_alpha": cfg.lora.resolved_alpha(),
        "alpha_policy": cfg.lora.alpha_policy,
        "target_modules": value_label(cfg.lora.target_modules),
        "context_length": cfg.model.max_position_embeddings,
        "lr": cfg.train.lr,
        "config_hash": config_hash,
        "study_hash": study_hash,
        "git_commit": git_commit(),
        "run_dir": run_dir,
        "reused_from": reused_from,
        "concurrency": concurrency,
    }
    for k in RESULT_KEYS:
        row[k] = finite_or_none(result.get(k))
    row["peak_memory_bytes"] = device_peak_bytes(result)
    return typing.cast(Row, {c: row.get(c) for c in COLUMNS})


class ResultsFileError(ValueError):
    """results.jsonl holds a line that is not a row; the message names the line and the way out."""


def numbered_rows(out_dir: Path) -> list[tuple[int, Row]]:
    """Every row ever written with its line number in results.jsonl, oldest first ([] if there is no results file
    yet). A line that is not JSON, or not a Row (experiments.finetune.row.row_problems), raises ResultsFileError
    naming it; the file is left as it is."""
    path = Path(out_dir) / RESULTS_JSONL
    if not path.exists():
        return []
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise _bad_line(path, n, f"is not JSON ({e})") from None
        problems = row_problems(row)
        if problems:
            raise _bad_line(path, n, f"is not a result row (it {'; '.join(problems)})")
        rows.append((n, row))
    return rows


def read_rows(out_dir: Path) -> list[Row]:
    """Every row ever written, oldest first: numbered_rows without the line numbers."""
    return [row for _, row in numbered_rows(out_dir)]


def _bad_line(path: Path, n: int, why: str) -> ResultsFileError:
    return ResultsFileError(
        f"{path}, line {n} {why}. The file was left as it is: delete or fix that line (rows are one JSON object "
        "per line), or move the file aside to start a new results file, then run the command again."
    )


def latest(rows: Iterable[Row]) -> dict[tuple[str, str], Row]:
    """The latest row per (ablation, config hash): what a re-run replaced no longer counts."""
    out: dict[tuple[str, str], Row] = {}
    for r in rows:
        out[(r["ablation"], r["config_hash"])] = r
    return out


def to_csv(rows: list[Row]) -> str:
    """The rows as CSV: every column of Row in order, empty cells blank."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS})
    return buf.getvalue()


def append_row(out_dir: Path, row: Row) -> None:
    """Append `row` (a Row; else ValueError naming what is wrong, and nothing written): under the results lock,
    rewrite results.jsonl with all rows to a temp file and rename it, then regenerate the CSV."""
    problems = row_problems(row)
    if problems:  # refused before the file is touched: written, it would make every later read refuse the file
        raise ValueError(
            f"not a result row, not appended to {RESULTS_JSONL}: it {'; '.join(problems)} (make_row builds rows)"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(out_dir / RESULTS_LOCK):
        rows = read_rows(out_dir) + [row]
        jsonl = "".join(json.dumps(r, default=str) + "\n" for r in rows)
        atomic_write(out_dir / RESULTS_JSONL, lambda f: f.write(jsonl.encode("utf-8")))
        atomic_write(out_dir / RESULTS_CSV, lambda f: f.write(to_csv(rows).encode("utf-8")))
