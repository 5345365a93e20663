"""What `python -m bench.train` measures: step times, bytes saved for backward, RSS, FLOPs, the matmul peak.

Timing uses CUDA events on a GPU (no host sync inside a round: one synchronize at its end) and
perf_counter on the CPU. Memory figures are only honest per process, so `bench.train` takes them
in a fresh subprocess per contender (see `measure_memory`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from training.memory import count_saved_for_backward


def time_steps(
    step: Callable[[], torch.Tensor], n: int, device: torch.device
) -> tuple[list[float], list[float] | None]:
    """Runs `step` n times; returns (wall seconds per step, CPU seconds per step or None on CUDA).

    CUDA: events around each step, one synchronize at the end. CPU: perf_counter, and also the
    process's CPU time (user + system, page faults included), which a machine shared with other
    jobs inflates far less than wall time when the run uses one thread.
    """
    if device.type == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
        events[0].record()
        for i in range(n):
            step()
            events[i + 1].record()
        torch.cuda.synchronize(device)
        return [events[i].elapsed_time(events[i + 1]) / 1e3 for i in range(n)], None
    wall, cpu = [], []
    for _ in range(n):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return wall, cpu


def summarize(rounds: list[list[float]], cpu_rounds: list[list[float]]) -> dict:
    """Median over all timed steps, the spread of per-round medians (noise on a shared machine), and
    the median CPU time per step where measured (CPU; on CUDA every round's CPU list is empty)."""
    times = [t for r in rounds for t in r]
    out = {
        "median_s": statistics.median(times),
        "steps": len(times),
        "rounds": len(rounds),
        "round_medians_s": [statistics.median(r) for r in rounds],
    }
    cpu_times = [t for r in cpu_rounds for t in r]
    if cpu_times:
        out["cpu_median_s"] = statistics.median(cpu_times)
    return out


def host_syncs(step: Callable[[], torch.Tensor], device: torch.device) -> int | None:
    """How many CUDA host syncs one step makes (torch.cuda.set_sync_debug_mode warnings); None on CPU."""
    if device.type != "cuda":
        return None
    import warnings

    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


# ---------------------------------------------------------------- memory
def saved_for_backward(loss_fn: Callable[[], torch.Tensor], model: nn.Module) -> dict:
    """Bytes autograd keeps for backward during one forward + loss, counted once per storage, leaving out
    the model's parameters and buffers (the frozen weights a Linear saves are not new memory)."""
    resident = list(model.parameters()) + list(model.buffers())
    with count_saved_for_backward(exclude=resident) as counter:
        loss = loss_fn()
    loss.backward()  # frees the graph; the caller zeroes the grads
    return {"activations": counter["bytes"]}


# ---------------------------------------------------------------- FLOPs
@dataclass
class FlopShape:
    batch: int
    seq: int
    d_model: int
    n_layer: int
    d_ff: int
    vocab: int
    arch: str = "opt"  # "llama": grouped-query k/v (kv_dim wide) and a gated MLP (gate, up, down)
    kv_dim: int | None = None  # llama: n_kv_head * head_dim (None: d_model)


def step_flops(s: FlopShape, mode: str, rank: int = 0, targets: tuple[str, ...] = ()) -> float:
    """Model FLOPs of one training step: matmuls only (embeddings, norms, softmax left out).

    Forward 2 FLOPs per multiply-add; backward needs input-gradients everywhere (1x forward) and
    weight-gradients only for trainable weights (1x forward): full fine-tuning 3x forward, frozen
    LoRA base 2x forward, adapters 3x. Causal attention counts the half of T^2 it needs
    (QK^T and PV: 2*T*d per token per layer forward, 2x that backward).
    """
    tokens = s.batch * s.seq
    d, f = s.d_model, s.d_ff
    shapes = {"q_proj": (d, d), "k_proj": (d, d), "v_proj": (d, d), "out_proj": (d, d), "fc1": (d, f), "fc2": (f, d)}
    if s.arch == "llama":
        kv = s.kv_dim or d
        shapes = {"q_proj": (d, d), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (d, d)}
        shapes |= {"gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}
    linear_fwd = 2 * tokens * (s.n_layer * sum(i * o for i, o in shapes.values()) + s.vocab * d)
    attn_fwd = 2 * tokens * s.seq * d * s.n_layer
    if mode == "full":
        return 3.0 * (linear_fwd + attn_fwd)
    lora_fwd = 2 * tokens * rank * s.n_layer * sum(i + o for name, (i, o) in shapes.items() if name in targets)
    return 2.0 * linear_fwd + 3.0 * attn_fwd + 3.0 * lora_fwd


def matmul_peak(device: torch.device, dtype: torch.dtype) -> dict:
    """The measured dense matmul rate (FLOP/s) MFU is quoted against: best of a few square GEMMs."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    reps = 20 if device.type == "cuda" else 5
    wall, cpu = time_steps(lambda: a @ b, reps, device)
    out = {"flops_per_s": 2 * n**3 / min(wall), "n": n, "dtype": str(dtype).removeprefix("torch.")}
    if cpu:  # on a shared CPU the wall-clock rate is whatever the other jobs leave; CPU time is steadier
        out["cpu_time_flops_per_s"] = 2 * n**3 / min(cpu)
    return out
