"""Resumable training state: trainable tensors, optimizer (and grad scaler) state, the step, RNG states, and
the curves so far. Written atomically, so an interruption mid-write leaves the previous checkpoint intact;
read with `weights_only=True` (only tensors, numbers, strings, lists and dicts are stored). A file that cannot
be read anyway (a disk error, a copy cut short) raises DamagedCheckpoint, and `set_aside` moves it out of the way.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from data.cache import atomic_write

CHECKPOINT_FILE = "checkpoint.pt"  # in a run folder: present only while a run is unfinished
_PARTS = ("trainable", "optimizer", "scaler", "rng_cpu", "rng_cuda", "state")


class DamagedCheckpoint(ValueError):
    """The checkpoint file cannot be read back (truncated, corrupt, or not a checkpoint at all)."""


def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint to `<name>.damaged-<time>` (kept for inspection, never resumed); returns it."""
    dest = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
    path.replace(dest)
    return dest


def save_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    state: dict[str, Any],
) -> None:
    """`state` holds the loop's plain values (step, curves, timings). Only trainable tensors are stored: the
    frozen base is rebuilt from its own checkpoint on resume."""
    blob = {
        "trainable": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "state": state,
    }
    atomic_write(Path(path), lambda f: torch.save(blob, f))


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None
) -> dict[str, Any]:
    """Restore everything `save_checkpoint` stored into live objects; returns the loop's `state` dict. Raises
    DamagedCheckpoint, before changing anything, when the file cannot be read as a checkpoint."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises OSError, RuntimeError, EOFError or UnpicklingError, by the damage
        raise DamagedCheckpoint(f"{path} cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(blob, dict) or any(k not in blob for k in _PARTS):
        raise DamagedCheckpoint(f"{path} is not a checkpoint of this training loop")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(blob["trainable"]):
        missing, extra = sorted(set(params) - set(blob["trainable"])), sorted(set(blob["trainable"]) - set(params))
        raise ValueError(
            f"{path} does not match this run's trainable parameters (missing {missing[:3]}, "
            f"unexpected {extra[:3]}): it was written by a different config. Delete it or drop --resume."
        )
    shapes = [(n, tuple(blob["trainable"][n].shape), tuple(p.shape)) for n, p in params.items()]
    wrong = [f"{n}: {got} in the file, {want} in this run" for n, got, want in shapes if got != want]
    if wrong:
        raise ValueError(
            f"{path} does not match this run's trainable parameters ({'; '.join(wrong[:3])}): it was written by a "
            "different config (another rank?). Delete it or drop --resume."
        )
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(blob["trainable"][n])
    optimizer.load_state_dict(blob["optimizer"])
    if scaler is not None and blob["scaler"] is not None:
        scaler.load_state_dict(blob["scaler"])
    torch.set_rng_state(blob["rng_cpu"])
    if blob["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(blob["rng_cuda"])
    return blob["state"]
