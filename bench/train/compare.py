"""One comparison of `python -m bench.train`: build contenders, check they compute the same function, time, measure.

Timing: all contenders live in this process and run in interleaved rounds (order rotated each round, warm-up
excluded); the figure is the median step over every timed step. Memory: each contender again in a fresh
subprocess (`bench.train.memory`), since peak RSS and CUDA peaks are per process.
"""

from __future__ import annotations

import gc
import statistics
import tempfile
from dataclasses import asdict, dataclass

import torch

from bench.train.measure import FlopShape, host_syncs, step_flops, summarize, time_steps
from bench.train.memory import measure_memory
from bench.train.steps import Contender, Shape, Spec, build, copy_lora_A, make_batch, save_random


@dataclass(frozen=True)
class Budget:
    """How much of each contender is run: `steps` timed steps per round (0: memory only), `rounds` rounds with
    `warmup` untimed steps each, and `memory` training steps in each memory subprocess (0: no memory figures)."""

    steps: int = 20
    rounds: int = 2
    warmup: int = 3
    memory: int = 3


def run_rounds(contenders: list[Contender], device: torch.device, budget: Budget) -> dict:
    """Rounds of warm-up, then `budget.steps` timed steps per contender. CPU: interleaved step by step (A B C,
    B C A, ...), so a load change on a shared machine hits every contender alike. CUDA: a block of `steps` per
    contender between two syncs (a sync per step would expose launch latency), the order rotated each round."""
    n = len(contenders)
    block = budget.steps if device.type == "cuda" else 1
    wall: dict[str, list[list[float]]] = {c.spec.label: [] for c in contenders}
    cpu: dict[str, list[list[float]]] = {c.spec.label: [] for c in contenders}
    for r in range(budget.rounds):
        for c in contenders:
            for _ in range(budget.warmup):
                c.step()
            wall[c.spec.label].append([])
            cpu[c.spec.label].append([])
        for i in range(budget.steps // block):
            k = (r + i) % n
            for c in contenders[k:] + contenders[:k]:
                w, t = time_steps(c.step, block, device)
                wall[c.spec.label][-1] += w
                cpu[c.spec.label][-1] += t or []
        for c in contenders:
            w, t = wall[c.spec.label][-1], cpu[c.spec.label][-1]
            print(
                f"  round {r + 1}/{budget.rounds} {c.spec.label:32s} {statistics.median(w) * 1e3:8.1f} ms/step"
                + (f"  (cpu {statistics.median(t) * 1e3:.1f} ms)" if t else ""),
                flush=True,
            )
    return {label: summarize(wall[label], cpu[label]) for label in wall}


def initial_losses(contenders: list[Contender]) -> dict[str, float]:
    with torch.no_grad():
        return {c.spec.label: c.loss_fn().item() for c in contenders}


def check_same_function(losses: dict[str, float], pairs: list[tuple[Spec, Spec]], tol: float) -> None:
    for ours, peer in pairs:
        a, b = losses[ours.label], losses[peer.label]
        if not abs(a - b) <= tol:
            raise RuntimeError(
                f"initial losses differ: {ours.label} {a:.6f} vs {peer.label} {b:.6f} (tol {tol}); "
                f"the two sides do not compute the same function, so timing them means nothing"
            )


def _check_in_fp32(specs: list[Spec], shape: Shape, folder: str, device: torch.device, batch) -> None:
    """The strict same-function check of one LoRA pair in fp32, before bf16 rounding blurs it."""
    exact = [s for s in specs if s.mode == "lora" and not s.compile][:1]
    exact = exact + [exact[0].peer()] if exact and exact[0].side == "ours" else []
    if exact:
        cs = [build(s, shape, folder, device, "fp32", batch) for s in exact]
        check_same_function(initial_losses(cs), [tuple(exact)], 1e-4)


def compare(
    shape: Shape, pairs: list[tuple[Spec, Spec]], device: torch.device, precision: str, budget: Budget, peak: dict
) -> dict:
    """Builds every contender of `pairs` from one random checkpoint (OPT or Llama: shape.arch), checks, times,
    measures."""
    specs = list(dict.fromkeys(s for pair in pairs for s in pair))
    with tempfile.TemporaryDirectory(prefix="bench_train_") as folder:
        save_random(shape, folder)
        batch = make_batch(shape, device)
        if precision != "fp32":
            _check_in_fp32(specs, shape, folder, device, batch)
        built: dict[Spec, Contender] = {s: build(s, shape, folder, device, precision, batch) for s in specs}
        for ours, peer in pairs:
            if ours.mode == "lora" and ours.side == "ours" and peer.side == "peer":
                copy_lora_A(built[peer], built[ours])
        loss0 = initial_losses(list(built.values()))
        check_same_function(loss0, pairs, 1e-4 if precision == "fp32" else 5e-2)
        print(
            f"{shape} {precision}: initial losses agree: " + ", ".join(f"{k} {v:.5f}" for k, v in loss0.items()),
            flush=True,
        )
        syncs = {c.spec.label: host_syncs(c.step, device) for c in built.values()}
        timing = run_rounds(list(built.values()), device, budget) if budget.steps else {}
        loss_n = initial_losses(list(built.values()))
        counts = {s: (c.trainable, c.total) for s, c in built.items()}
        del built  # free this process's memory (a GPU's above all) before the memory workers start
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        mems = (
            {s.label: measure_memory(s, shape, folder, device, precision, budget.memory) for s in specs}
            if budget.memory
            else {}
        )
    kv_dim = (shape.n_kv_head or shape.n_head) * (shape.d_model // shape.n_head)
    flop_shape = FlopShape(
        shape.batch, shape.seq, shape.d_model, shape.n_layer, shape.d_ff, shape.vocab, shape.arch, kv_dim
    )
    rows = []
    for s, (trainable, total) in counts.items():
        t = timing.get(s.label)
        flops = step_flops(flop_shape, s.mode, s.rank, s.targets)
        rows.append(
            {
                "label": s.label,
                "spec": s.to_dict(),
                "trainable": trainable,
                "total": total,
                "step_s": t and t["median_s"],
                "tokens_per_s": t and shape.tokens / t["median_s"],
                "timing": t,
                "cpu_time_tokens_per_s": shape.tokens / t["cpu_median_s"] if t and "cpu_median_s" in t else None,
                "flops_per_step": flops,
                "achieved_flops_per_s": t and flops / t["median_s"],
                "mfu": t and mfu(flops, t, peak),
                "loss_initial": loss0[s.label],
                "loss_after": loss_n[s.label],
                "steps_trained": budget.rounds * (budget.warmup + budget.steps) + (syncs[s.label] is not None),
                "host_syncs_per_step": syncs[s.label],
                "memory": mems.get(s.label),
            }
        )
    by = {r["label"]: r for r in rows}
    ratios = [ratio(by[o.label], by[p.label]) for o, p in pairs]
    return {"shape": asdict(shape) | {"tokens": shape.tokens}, "rows": rows, "ratios": ratios}


def mfu(flops: float, timing: dict, peak: dict) -> float:
    """Model FLOPs / step time / measured matmul peak. CPU: both in CPU time (the share of a shared machine this
    process got); CUDA: wall time against the bf16 (or fp32) GEMM peak."""
    if "cpu_median_s" in timing and "cpu_time_flops_per_s" in peak:
        return flops / timing["cpu_median_s"] / peak["cpu_time_flops_per_s"]
    return flops / timing["median_s"] / peak["flops_per_s"]


def nested(d: dict | None, keys: tuple[str, ...]):
    """d[k0][k1]... or None where a level is missing (memory figures differ between CPU and CUDA)."""
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


MEMORY_RATIOS = {
    "peak_allocated": ("peak_allocated",),
    "peak_reserved": ("peak_reserved",),
    "saved_activations": ("saved", "activations"),
    "rss_step_delta": ("rss_step_delta",),
}


def ratio(ours: dict, peer: dict) -> dict:
    """Ours against the peer: tokens/s speed-up (wall and, on CPU, CPU time) and each memory figure's ratio."""
    out = {
        "ours": ours["label"],
        "peer": peer["label"],
        "speedup": ours["tokens_per_s"] / peer["tokens_per_s"] if ours["tokens_per_s"] else None,
    }
    if ours["cpu_time_tokens_per_s"] and peer["cpu_time_tokens_per_s"]:
        out["speedup_cpu_time"] = ours["cpu_time_tokens_per_s"] / peer["cpu_time_tokens_per_s"]
    for name, k in MEMORY_RATIOS.items():
        a, b = nested(ours["memory"], k), nested(peer["memory"], k)
        if a is not None and b:
            out[f"{name}_ratio"] = a / b
    return out
