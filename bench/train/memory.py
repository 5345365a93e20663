"""The memory figures of `python -m bench.train`: one contender per fresh process, since peaks are per process.

`measure_memory` starts `python -m bench.train.memory '<payload JSON>'`, which builds the contender alone, runs a
few training steps and prints its figures as one JSON line.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from bench.train.measure import saved_for_backward
from bench.train.steps import Shape, Spec, build, make_batch
from training.memory import peak_rss_bytes, reset_peaks, rss_bytes


def memory_worker(payload: dict) -> dict:
    """Runs in a fresh process: builds one contender alone and measures its memory over a few steps.

    CUDA: peak allocated / reserved over the steps (weights, grads, optimizer state, activations).
    CPU: peak RSS during the steps minus RSS after building (VmHWM reset via /proc/self/clear_refs).
    Both: bytes saved for backward by one forward + loss.
    """
    torch.set_num_threads(payload["threads"])
    device = torch.device(payload["device"])
    spec = Spec(**{k: tuple(v) if k == "targets" else v for k, v in payload["spec"].items() if k != "label"})
    shape = Shape(**payload["shape"])
    batch = make_batch(shape, device)
    c = build(spec, shape, payload["folder"], device, payload["precision"], batch)
    out: dict = {}
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        out["static_allocated"] = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        out["rss_peak_is_per_step"] = reset_peaks(device)
        out["rss_after_build"] = rss_bytes()
    for _ in range(payload["steps"]):
        c.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        out["peak_allocated"] = torch.cuda.max_memory_allocated(device)
        out["peak_reserved"] = torch.cuda.max_memory_reserved(device)
    else:
        out["rss_peak"] = peak_rss_bytes()
        out["rss_step_delta"] = out["rss_peak"] - out["rss_after_build"]
    if not spec.compile:  # compiled graphs save through AOTAutograd, not the eager hooks
        out["saved"] = saved_for_backward(c.loss_fn, c.model)
        c.optimizer.zero_grad(set_to_none=True)
    return out


def measure_memory(spec: Spec, shape: Shape, folder: str, device: torch.device, precision: str, steps: int) -> dict:
    """`memory_worker` in a fresh process with this process's thread count; {"error": ...} if it fails."""
    payload = {
        "spec": spec.to_dict(),
        "shape": asdict(shape),
        "folder": folder,
        "device": str(device),
        "precision": precision,
        "steps": steps,
        "threads": torch.get_num_threads(),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "bench.train.memory", json.dumps(payload)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(memory_worker(json.loads(sys.argv[1]))))
