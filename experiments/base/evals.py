"""The base model's losses, evaluated once per study instead of once per run.

Every run of a study starts from the same base model (LoRA's B is zero, so the injected model computes exactly
the base's outputs) and is evaluated on the same validation and source tokens at its context length, before
training. Those "before" figures are the same for every run at one context: recomputing them cost each default
run ~9 s on 2 CPU cores (validation 6.0-6.3 s, source set 2.9-3.1 s at context 512). They are cached in
`data.cache_dir("base_evals")`, keyed by everything the number depends on (the base folder's content, the token
windows, the evaluation batch, dtype, device and thread count), so a cached figure is the one the run would have
computed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from data.cache import cache_dir, json_hash, short_hash, write_json_atomic

BASE_EVALS = "base_evals"  # the cache subfolder


def _weights_stamp(base_dir: Path) -> list[str]:
    """Size and modification time of each weight file (a GGUF base is one file): base_fingerprint reads only sizes,
    and a checkpoint overwritten in place with new weights of the same size must not be served an old figure."""
    folder_files = sorted(base_dir.glob("*.safetensors")) + sorted(base_dir.glob("*.bin"))
    files = [base_dir] if base_dir.is_file() else folder_files
    return [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]


def eval_key(base_dir: Path, fingerprint: str, windows: tuple[torch.Tensor, torch.Tensor], setting: dict) -> str:
    """The cache key of the base model's loss on `windows` (inputs, targets) under `setting` (batch, dtype, ...);
    `fingerprint` is the folder's `experiments.base.pretrain.base_fingerprint`."""
    x, y = windows
    tokens = short_hash(str(tuple(x.shape)), x.numpy().tobytes(), y.numpy().tobytes())
    stamp = {"base": fingerprint, "weights": _weights_stamp(base_dir), "tokens": tokens}
    return json_hash({**stamp, **setting, "threads": torch.get_num_threads()})


def cached_base_loss(key: str, compute: Callable[[], float]) -> float:
    """The loss stored under `key`, or `compute()`, then stored. An unreadable entry is recomputed. Not for DDP:
    every process must take part in an evaluation, and one may find the entry another has just written."""
    path = cache_dir(BASE_EVALS) / f"{key}.json"
    try:
        return float(json.loads(path.read_text(encoding="utf-8"))["loss"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    loss = compute()
    write_json_atomic(path, {"loss": loss})
    return loss
