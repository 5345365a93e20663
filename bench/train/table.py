"""What `python -m bench.train` prints and records besides the figures: the environment, and the markdown table."""

from __future__ import annotations

import datetime
import platform

import torch

from bench.train.compare import nested
from experiments.report.fmt import MIB, md_table
from training.distributed import device_name


def environment(device: torch.device, precision: str) -> dict:
    """Date, device, library versions, threads and precision: what a reader needs to compare two result files."""
    import peft
    import transformers

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": {"type": device.type, "name": device_name(device)},
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "python": platform.python_version(),
        },
        "threads": torch.get_num_threads(),
        "precision": precision,
    }


def _mib(x: float | None) -> str | None:
    return None if x is None else f"{x / MIB:.1f}"


def _versus_peer(r: dict | None, cuda: bool) -> str | None:
    """The "x peer" cell: speed-up (and CPU-time speed-up) and the memory ratio of the device's main figure."""
    if not r:
        return None
    parts = []
    if r["speedup"]:
        cpu_time = f" (cpu-time {r['speedup_cpu_time']:.2f}x)" if "speedup_cpu_time" in r else ""
        parts.append(f"{r['speedup']:.2f}x{cpu_time}")
    mr = r.get("peak_allocated_ratio" if cuda else "saved_activations_ratio")
    if mr is not None:
        parts.append(f"mem {mr:.2f}x")
    return ", ".join(parts)


def table(result: dict, device: torch.device) -> str:
    """One comparison as a markdown table: a row per contender; CUDA shows allocator peaks, CPU saved bytes and RSS."""
    cuda = device.type == "cuda"
    head = ["contender", "trainable", "ms/step", "tokens/s", "x peer", "MFU"]
    head += ["peak alloc MiB", "peak rsvd MiB"] if cuda else ["saved MiB", "RSS delta MiB"]
    head += ["loss0", "loss_after"]
    speed = {r["ours"]: r for r in result["ratios"]}
    rows = []
    for row in result["rows"]:
        m = row["memory"]
        mem_keys = (
            [("peak_allocated",), ("peak_reserved",)] if cuda else [("saved", "activations"), ("rss_step_delta",)]
        )
        timed = row["step_s"] is not None
        cells = [
            row["label"],
            f"{row['trainable']:,}",
            f"{row['step_s'] * 1e3:.1f}" if timed else None,
            f"{row['tokens_per_s']:,.0f}" if timed else None,
            _versus_peer(speed.get(row["label"]), cuda),
            f"{row['mfu'] * 100:.1f}%" if row["mfu"] is not None else None,
            *[_mib(nested(m, k)) for k in mem_keys],
            f"{row['loss_initial']:.4f}",
            f"{row['loss_after']:.4f}",
        ]
        rows.append(cells)
    return md_table(head, rows)
