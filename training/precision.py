"""Which precision a run trains in, and the frozen weights kept in it.

`train.dtype: auto` is bf16 autocast on CUDA, and on a CPU with native bf16 matrix instructions (AVX512-BF16, which
every AMX CPU also has), float32 elsewhere. On CPU the choice is made from the CPU's flags (as torch's cpuinfo reads
them), not from a timing probe at start-up, because a probe would make the precision, and with it the cached base
and every number of a study, depend on how loaded the machine was in that second: on a shared 2-core machine a probe
of a few hundred milliseconds is mostly noise. The flags were checked against measurements: bf16 autocast made the
bench.train LoRA step 1.6x faster on an AMX Xeon and 1.5x on an AVX512-BF16 EPYC (bench/NOTES.md). A CPU without
those units (AVX2, AVX-512 without BF16, ARM) keeps float32, exactly as before, so `auto` costs it nothing.
"""

from __future__ import annotations

import torch
from torch import nn


def cpu_bf16_units() -> str | None:
    """The CPU's native bf16 matrix instructions ("AMX" or "AVX512-BF16"), or None where it has none (or torch
    lacks oneDNN, which is what runs bf16 GEMMs on CPU). Tests monkeypatch this to play a CPU without them."""
    if not torch.backends.mkldnn.is_available() or not torch.cpu._is_avx512_bf16_supported():
        return None
    return "AMX" if torch.cpu._is_amx_tile_supported() else "AVX512-BF16"


def amp_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a `train.dtype` setting; None means plain float32 (no autocast).

    auto: bfloat16 on CUDA and on a CPU with bf16 units (cpu_bf16_units), float32 elsewhere."""
    if name == "auto":
        if device.type == "cuda" or (device.type == "cpu" and cpu_bf16_units() is not None):
            return torch.bfloat16
        return None
    return None if name == "float32" else getattr(torch, name)


def dtype_label(dtype: torch.dtype | None) -> str:
    """What a result row's `dtype` column says: "float32" or "bfloat16 autocast" (float16 likewise)."""
    return "float32" if dtype is None else f"{str(dtype).removeprefix('torch.')} autocast"


def keep_frozen_in(model: nn.Module, dtype: torch.dtype | None) -> int:
    """Store the frozen weight matrices (and biases) of the model's linear layers in bf16 when training runs under
    bf16 autocast; returns how many parameters it cast.

    Why: autocast casts a float32 weight to bf16 on every call and caches the cast only for weights that require
    grad, so each frozen weight was read in float32 and written in bf16 on every forward. Stored in bf16 they are
    read as they are, and take half the memory. A plain linear computes bit for bit what it computed before (it
    rounds its weight to bf16 the same way); a LoRALinear's fused path then merges into the bf16-rounded weight
    (bench/NOTES.md measures what that does). LoRA's A/B (trainable) stay float32, so do the optimizer state,
    norms, and an embedding matrix tied to the head (casting it would make the residual stream bf16).
    Nothing happens for float32 or float16 (whose GradScaler path is left as it was). Afterwards the cast layers
    run only under autocast (outside it a float32 input meets a bf16 weight)."""
    if dtype != torch.bfloat16:
        return 0
    skip = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}  # tied heads too
    cast = 0
    for module in model.modules():
        if not (isinstance(module, nn.Linear) or hasattr(module, "lora_A")):
            continue
        for name in ("weight", "bias"):
            p = getattr(module, name, None)
            if isinstance(p, nn.Parameter) and not p.requires_grad and id(p) not in skip and p.is_floating_point():
                p.data = p.data.to(torch.bfloat16)
                skip.add(id(p))  # a weight shared by two layers is cast (and counted) once
                cast += p.numel()
    return cast
