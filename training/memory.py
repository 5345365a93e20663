"""What a run costs in memory: CUDA allocator peaks, the process's peak RSS on CPU, and the activation bytes
autograd saves for backward (the one figure that is the same on every device, so CPU runs can compare it).
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch


def reset_peaks(device: torch.device) -> bool:
    """Start a run's peak counters from what is resident now, so loading data and the model is not counted.

    CUDA: the allocator's peak stats. CPU: Linux resets a process's peak RSS (VmHWM) when "5" is written to
    /proc/self/clear_refs; elsewhere the peak counts from process start (returns False), which is why the
    runner also gives every run its own process.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _proc_status_bytes(field: str) -> int | None:
    """A memory field of /proc/self/status ("VmRSS", "VmHWM") in bytes; None where there is no /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """Resident set size of this process now (Linux VmRSS; 0 where /proc is missing)."""
    return _proc_status_bytes("VmRSS") or 0


def peak_rss_bytes() -> int:
    """Peak resident set size of this process: VmHWM on Linux (resettable), else ru_maxrss since start."""
    peak = _proc_status_bytes("VmHWM")
    if peak is not None:
        return peak
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def memory_peaks(device: torch.device) -> dict[str, int | None]:
    """The run's memory peaks: allocator figures on CUDA, the process's peak RSS on CPU."""
    out: dict[str, int | None] = {
        "peak_allocated_bytes": None,
        "peak_reserved_bytes": None,
        "peak_active_bytes": None,
        "peak_rss_bytes": None,
    }
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        stats = torch.cuda.memory_stats(device)
        out["peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated(device))
        out["peak_reserved_bytes"] = int(torch.cuda.max_memory_reserved(device))
        out["peak_active_bytes"] = int(stats.get("active_bytes.all.peak", 0))
    else:
        out["peak_rss_bytes"] = peak_rss_bytes()
    return out


@contextmanager
def count_saved_for_backward(exclude: Iterable[torch.Tensor] = ()) -> Iterator[dict[str, int]]:
    """Count the bytes of the distinct storages autograd saves for backward inside the block.

    Storages of `exclude` (the model's parameters and buffers, resident anyway) are not counted, so the figure
    is the activation memory a training step holds between forward and backward. Views of one storage count
    once. Every saved tensor stays referenced by the graph until backward, so no two live storages share an
    address while the block runs and the data pointer identifies a storage.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}
    counter = {"bytes": 0}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without a storage (e.g. sparse): nothing to count
            return t
        ptr = storage.data_ptr()
        if ptr not in skip and ptr not in seen:
            seen[ptr] = storage.nbytes()
            counter["bytes"] += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield counter
