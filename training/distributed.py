"""DDP plumbing: which process am I, on which device, and how to add a tensor up across processes.

Under `torchrun --nproc_per_node N` the environment carries RANK / WORLD_SIZE / LOCAL_RANK; without it this is
one process and every function here is a no-op, so the loop reads the same either way.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    world_size: int
    device: torch.device
    owns_group: bool  # True if we created the process group and must destroy it

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes files and logs."""
        return self.rank == 0


def resolve_device(kind: str) -> torch.device:
    """ "auto" means CUDA when there is one; asking for CUDA without one is a clear error."""
    if kind == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but torch sees no CUDA device; set train.device: cpu or auto.")
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(kind)


def device_name(device: torch.device) -> str:
    """What results and benchmarks record as the device: the GPU's name, or the CPU model and its thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu ({cpu}, {torch.get_num_threads()} threads)"


def setup(device_kind: str) -> DistInfo:
    """Join the process group torchrun describes (nccl on CUDA, gloo on CPU), or stay single-process."""
    device = resolve_device(device_kind)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistInfo(0, 1, device, owns_group=False)
    owns = not dist.is_initialized()
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if owns:
        init_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), device, owns_group=owns)


def init_group(backend: str) -> None:
    """init_process_group, with torch.distributed.nn imported first.

    That module's functions take `group=group.WORLD` as a default argument, evaluated on its first import, which DDP
    makes. Imported after the group exists, those ten defaults keep it alive past destroy_process_group: gloo's
    threads then run on into interpreter exit, where a rank can abort ("terminate called without an active
    exception", exit -6) after its work is done. Imported before, the defaults are None."""
    import torch.distributed.nn  # noqa: F401

    dist.init_process_group(backend=backend)


def teardown(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum over processes, in place (a no-op with one process)."""
    if info.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
