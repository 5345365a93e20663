"""What one fine-tuning run reports: the keys of its result, written to RUN_DIR/result.json when it ends.

The sweep copies these into the run's row of the results file (`experiments.sweep.results`); a runner that loses
its run reads the file back from the run folder.
"""

from __future__ import annotations

import json
from pathlib import Path

RESULT_FILE = "result.json"  # in a run folder: what the run reported (RESULT_KEYS), written when it ends

# What a fine-tuning run reports, copied into its row as is.
RESULT_KEYS = tuple(
    """
    status error diverged_step val_loss val_ppl best_val_loss best_val_ppl base_val_loss base_val_ppl
    source_val_loss source_val_ppl base_source_val_ppl forgetting tune_loss
    train_tokens steps train_time_s tokens_per_s trainable_params total_params
    peak_allocated_bytes peak_reserved_bytes peak_active_bytes peak_rss_bytes saved_for_backward_bytes
    device dtype torch_version world_size corpus_fingerprint base_fingerprint
""".split()
)


def read_result(run_dir: Path) -> dict | None:
    """What a run reported in its folder (RESULT_FILE), or None: not finished, or the file cannot be read."""
    try:
        return json.loads((Path(run_dir) / RESULT_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
