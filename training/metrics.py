"""Where a run's numbers go (run_dir/metrics.jsonl always, Weights & Biases when WANDB_PROJECT is set), and the
two conversions every number passes through: JSON-safe floats and perplexity.

Only the process that owns the run directory (rank 0) makes a `MetricsLog`; the others pass `enabled=False`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import uuid
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


def finite_or_none(value: Any) -> Any:
    """JSON has no NaN/inf: a diverged loss is written as null and stays recognisable by the run's status."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def perplexity(loss: float | None) -> float | None:
    """exp(loss), None for a missing or non-finite loss; clamped below float overflow (exp(709) is the largest)."""
    return None if loss is None or not math.isfinite(loss) else math.exp(min(loss, 700.0))


def read_metrics(run_dir: Path) -> list[dict]:
    """The records a run logged, in order ([] when it has no metrics file: rows written before runs kept one, or a
    results folder copied without its runs/). A line that is not JSON is an error naming the file and line."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    records = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i} is not a JSON record ({e.msg}); delete the line or rerun the run") from None
    return records


class MetricsLog:
    """Append-only metrics of one run, mirrored to W&B if asked for (`resume`: continue the same W&B run)."""

    def __init__(
        self,
        run_dir: Path,
        *,
        config: dict,
        group: str | None = None,
        name: str | None = None,
        enabled: bool = True,
        resume: bool = False,
    ) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_FILE
        self.wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if os.environ.get("WANDB_PROJECT"):
            self.wandb = _start_wandb(Path(run_dir), config, group, name, resume=resume)

    def truncate_after(self, step: int) -> None:
        """Keep only records up to `step`, the step training (re)starts from: what an interrupted process logged
        after its last checkpoint is dropped, so the file reads as one uninterrupted run. Step 0 keeps nothing."""
        if not self.enabled:
            return
        kept = []
        if step > 0 and self.path.exists():
            for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # the half-written last line of a killed process
                    continue
                if record.get("step", 0) <= step:
                    kept.append(line)
        self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def log(self, record: dict) -> None:
        """One record with a "step" key, e.g. {"step": 10, "train_loss": 3.2, "lr": 1e-3, "tokens": 81920}."""
        if not self.enabled:
            return
        record = {k: finite_or_none(v) for k, v in record.items()}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def finish(self, summary: dict) -> None:
        """The run's final numbers go to the W&B run summary; the JSONL file needs no closing."""
        if self.wandb is not None:
            for k, v in summary.items():
                self.wandb.summary[k] = finite_or_none(v)
            self.wandb.finish(exit_code=0 if summary.get("status") == "ok" else 1)
            self.wandb = None


def _start_wandb(run_dir: Path, config: dict, group: str | None, name: str | None, resume: bool) -> Any:
    """A W&B run for this run directory; its id is kept in the directory so `--resume` continues the same run."""
    try:
        import wandb
    except ImportError:
        print(
            "warning: WANDB_PROJECT is set but wandb is not installed (pip install wandb); "
            "logging to metrics.jsonl only.",
            file=sys.stderr,
        )
        return None
    id_file = run_dir / "wandb_id.txt"
    if resume and id_file.exists():
        run_id = id_file.read_text().strip()
    else:
        run_id = uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
    return wandb.init(
        project=os.environ["WANDB_PROJECT"],
        group=group,
        name=name,
        config=config,
        dir=str(run_dir),
        id=run_id,
        resume="allow",
    )
