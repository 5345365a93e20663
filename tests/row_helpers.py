"""A result row as the sweep writes it, for tests that need a real one (append_row refuses anything else)."""

from __future__ import annotations

import dataclasses

from experiments.config.config import load_config
from experiments.finetune.row import RESULT_KEYS
from experiments.run import DEFAULT_STUDY
from experiments.sweep.plan import RunSpec, plan_runs
from experiments.sweep.results import make_row


def a_row(spec: RunSpec | None = None, **over) -> dict:
    """A row as the sweep writes it, for `spec` (default: the rank-4 run of the default study), with a finished
    run's numbers; `over` replaces cells of the row."""
    spec = spec or plan_runs(load_config(DEFAULT_STUDY[0]), name="abl_lora_rank", values=[4])[0]
    who = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
    result = {
        **dict.fromkeys(RESULT_KEYS),
        "status": "ok",
        "val_loss": 2.5,
        "val_ppl": 12.18,
        "train_tokens": 4096,
        "steps": 4,
        "train_time_s": 1.5,
        "peak_rss_bytes": 3 << 28,
        "trainable_params": 8192,
        "device": "cpu (test, 2 threads)",
        "world_size": 1,
    }
    return {**make_row(**who, result=result, run_dir="runs/x"), **over}
