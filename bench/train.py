"""`python -m bench.train`: one LoRA training step of our GPT + inject_lora vs transformers' OPT + PEFT.

Both sides load the same random-init OPT checkpoint (saved to a temp folder), see the same batch,
precision, LoRA rank/alpha/targets, AdamW and dropout 0, and must agree on the initial loss before
anything is timed. Timing: all contenders live in this process and run in interleaved rounds
(order rotated each round, warm-up excluded); the figure is the median step over every timed step.
Memory: each contender again in a fresh subprocess (peak RSS and CUDA peaks are per process), plus
the bytes autograd saves for backward.

    python -m bench.train                 # the table: LoRA q,v / LoRA all six / full fine-tuning
    python -m bench.train --ablations     # our optimisations switched off one at a time
    python -m bench.train --sweep         # context 256..2048 and rank 4..64, ours vs PEFT
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

import torch

from bench.train_measure import (
    FlopShape,
    host_syncs,
    matmul_peak,
    saved_for_backward,
    step_flops,
    summarize,
    time_steps,
)
from bench.train_steps import (
    SHAPES,
    TARGETS_ALL,
    TARGETS_QV,
    Contender,
    Shape,
    Spec,
    build,
    copy_lora_A,
    make_batch,
    save_random_opt,
)
from data.cache import write_json_atomic
from experiments.training.distributed import device_name
from experiments.training.memory import peak_rss_bytes, reset_peaks, rss_bytes

RESULTS = Path(__file__).parent / "results"
MB = 2**20


# ---------------------------------------------------------------- environment
def environment(device: torch.device, precision: str) -> dict:
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


def write_json(payload: dict, path: Path) -> Path:
    """Writes atomically (temp file + rename) so a killed run never leaves half a file."""
    write_json_atomic(path, payload)
    return path


# ---------------------------------------------------------------- one process per memory figure
def memory_worker(payload: dict) -> dict:
    """Runs in a fresh process: builds one contender alone and measures its memory over a few steps.

    CUDA: peak allocated / reserved over the steps (weights, grads, optimizer state, activations).
    CPU: peak RSS during the steps minus RSS after building (VmHWM reset via /proc/self/clear_refs).
    Both: bytes saved for backward by one forward + loss.
    """
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


def measure_memory(spec: Spec, shape: Shape, folder: str, device: torch.device, precision: str, steps: int = 3) -> dict:
    payload = {
        "spec": spec.to_dict(),
        "shape": asdict(shape),
        "folder": folder,
        "device": str(device),
        "precision": precision,
        "steps": steps,
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.train",
            "--threads",
            str(torch.get_num_threads()),
            "--_worker",
            json.dumps(payload),
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- timing
def run_rounds(contenders: list[Contender], device: torch.device, steps: int, rounds: int, warmup: int) -> dict:
    """Rounds of warm-up, then `steps` timed steps per contender. CPU: interleaved step by step (A B C,
    B C A, ...), so a load change on a shared machine hits every contender alike. CUDA: a block of
    `steps` per contender between two syncs (a sync per step would expose launch latency), the order
    rotated each round."""
    n = len(contenders)
    block = steps if device.type == "cuda" else 1
    wall: dict[str, list[list[float]]] = {c.spec.label: [] for c in contenders}
    cpu: dict[str, list[list[float]]] = {c.spec.label: [] for c in contenders}
    for r in range(rounds):
        for c in contenders:
            for _ in range(warmup):
                c.step()
            wall[c.spec.label].append([])
            cpu[c.spec.label].append([])
        for i in range(steps // block):
            k = (r + i) % n
            for c in contenders[k:] + contenders[:k]:
                w, t = time_steps(c.step, block, device)
                wall[c.spec.label][-1] += w
                cpu[c.spec.label][-1] += t or []
        for c in contenders:
            w, t = wall[c.spec.label][-1], cpu[c.spec.label][-1]
            print(
                f"  round {r + 1}/{rounds} {c.spec.label:32s} {statistics.median(w) * 1e3:8.1f} ms/step"
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


# ---------------------------------------------------------------- one comparison
def compare(
    shape: Shape,
    pairs: list[tuple[Spec, Spec]],
    device: torch.device,
    precision: str,
    *,
    steps: int,
    rounds: int,
    warmup: int,
    memory: int,
    peak: dict | None,
) -> dict:
    """Builds every contender of `pairs` from one random OPT checkpoint, checks, times, measures."""
    specs = list(dict.fromkeys(s for pair in pairs for s in pair))
    with tempfile.TemporaryDirectory(prefix="bench_train_") as folder:
        save_random_opt(shape, folder)
        batch = make_batch(shape, device)
        if precision != "fp32":  # the strict same-function check runs in fp32, before bf16 rounding
            exact = [s for s in specs if s.mode == "lora" and not s.compile][:1]
            exact = exact + [exact[0].peer()] if exact and exact[0].side == "ours" else []
            if exact:
                cs = [build(s, shape, folder, device, "fp32", batch) for s in exact]
                check_same_function(initial_losses(cs), [tuple(exact)], 1e-4)
                del cs
        built: dict[Spec, Contender] = {}
        for s in specs:
            built[s] = build(s, shape, folder, device, precision, batch)
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
        timing = run_rounds(list(built.values()), device, steps, rounds, warmup) if steps else {}
        loss_n = initial_losses(list(built.values()))
        counts = {s: (c.trainable, c.total) for s, c in built.items()}
        del built  # free this process's memory (a GPU's above all) before the memory workers start
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        mems = {s.label: measure_memory(s, shape, folder, device, precision, memory) for s in specs} if memory else {}
        rows = []
        for s, (trainable, total) in counts.items():
            t = timing.get(s.label)
            flops = step_flops(
                FlopShape(shape.batch, shape.seq, shape.d_model, shape.n_layer, shape.d_ff, shape.vocab),
                s.mode,
                s.rank,
                s.targets,
            )
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
                    "steps_trained": rounds * (warmup + steps) + (syncs[s.label] is not None),
                    "host_syncs_per_step": syncs[s.label],
                    "memory": mems.get(s.label),
                }
            )
    by = {r["label"]: r for r in rows}
    ratios = [ratio(by[o.label], by[p.label], device) for o, p in pairs]
    return {"shape": asdict(shape) | {"tokens": shape.tokens}, "rows": rows, "ratios": ratios}


def mfu(flops: float, timing: dict, peak: dict | None) -> float | None:
    """Model FLOPs / step time / measured matmul peak. CPU: both in CPU time (the share of a shared
    machine this process got); CUDA: wall time against the bf16 (or fp32) GEMM peak."""
    if not peak:
        return None
    if "cpu_median_s" in timing and "cpu_time_flops_per_s" in peak:
        return flops / timing["cpu_median_s"] / peak["cpu_time_flops_per_s"]
    return flops / timing["median_s"] / peak["flops_per_s"]


def _get(d: dict | None, keys: tuple[str, ...]):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def ratio(ours: dict, peer: dict, device: torch.device) -> dict:
    out = {
        "ours": ours["label"],
        "peer": peer["label"],
        "speedup": ours["tokens_per_s"] / peer["tokens_per_s"] if ours["tokens_per_s"] else None,
    }
    if ours["cpu_time_tokens_per_s"] and peer["cpu_time_tokens_per_s"]:
        out["speedup_cpu_time"] = ours["cpu_time_tokens_per_s"] / peer["cpu_time_tokens_per_s"]
    keys = {
        "peak_allocated": ("peak_allocated",),
        "peak_reserved": ("peak_reserved",),
        "saved_activations": ("saved", "activations"),
        "rss_step_delta": ("rss_step_delta",),
    }
    for name, k in keys.items():
        a, b = _get(ours["memory"], k), _get(peer["memory"], k)
        if a is not None and b:
            out[f"{name}_ratio"] = a / b
    return out


# ---------------------------------------------------------------- printing
def _mb(x) -> str:
    return "-" if x is None else f"{x / MB:.1f}"


def table(result: dict, device: torch.device) -> str:
    cuda = device.type == "cuda"
    head = ["contender", "trainable", "ms/step", "tokens/s", "x peer", "MFU"]
    head += ["peak alloc MB", "peak rsvd MB"] if cuda else ["saved MB", "RSS delta MB"]
    head += ["loss0", "loss_after"]
    speed = {r["ours"]: r for r in result["ratios"]}
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in result["rows"]:
        m = row["memory"]
        mem = (
            [_mb(_get(m, ("peak_allocated",))), _mb(_get(m, ("peak_reserved",)))]
            if cuda
            else [_mb(_get(m, ("saved", "activations"))), _mb(_get(m, ("rss_step_delta",)))]
        )
        r = speed.get(row["label"])
        parts = []
        if r and r["speedup"]:
            parts.append(
                f"{r['speedup']:.2f}x"
                + (f" (cpu-time {r['speedup_cpu_time']:.2f}x)" if "speedup_cpu_time" in r else "")
            )
        mr = r.get("peak_allocated_ratio" if cuda else "saved_activations_ratio") if r else None
        if mr is not None:
            parts.append(f"mem {mr:.2f}x")
        x = ", ".join(parts)
        timed = row["step_s"] is not None
        mfu = f"{row['mfu'] * 100:.1f}%" if row["mfu"] is not None else "-"
        lines.append(
            "| "
            + " | ".join(
                [
                    row["label"],
                    f"{row['trainable']:,}",
                    f"{row['step_s'] * 1e3:.1f}" if timed else "-",
                    f"{row['tokens_per_s']:,.0f}" if timed else "-",
                    x,
                    mfu,
                    *mem,
                    f"{row['loss_initial']:.4f}",
                    f"{row['loss_after']:.4f}",
                ]
            )
            + " |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- modes
def main_pairs() -> list[tuple[Spec, Spec]]:
    specs = [Spec(mode="lora", targets=TARGETS_QV), Spec(mode="lora", targets=TARGETS_ALL), Spec(mode="full")]
    return [(s, s.peer()) for s in specs]


def ablation_pairs(device: torch.device) -> list[tuple[Spec, Spec]]:
    """Our default against each optimisation switched off (or on) alone, all against PEFT."""
    base = Spec()
    variants = [
        base,
        replace(base, lora_impl="plain"),
        replace(base, loss="full"),
        replace(base, fused_adamw=device.type != "cuda"),
        replace(base, compile="loss"),
        replace(base, compile="blocks"),
        replace(base, checkpointing=True),
    ]
    pairs = [(v, v.peer()) for v in variants]
    return pairs


def sweep_shapes(base: Shape) -> list[tuple[str, Shape, int]]:
    """Context 256..2048 at the base's tokens per step, then rank 4..64 at the base length."""
    out = [("seq", replace(base, seq=t, batch=max(1, base.tokens // t)), 16) for t in (256, 512, 1024, 2048)]
    return out + [("rank", base, r) for r in (4, 8, 16, 32, 64)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    p.add_argument("--precision", default=None, help="fp32 | bf16 (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument(
        "--shape",
        action="append",
        choices=sorted(SHAPES),
        help="repeatable; default cpu on a CPU, gpu-512 and gpu-2048 on a GPU",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed steps per round (default 20; sweep 10); 0: memory only, no timing",
    )
    p.add_argument("--batch", type=int, default=None, help="override the shape's batch size")
    p.add_argument("--seq", type=int, default=None, help="override the shape's sequence length")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before each round's timed steps")
    p.add_argument("--no-memory", action="store_true", help="skip the per-contender memory subprocesses")
    p.add_argument("--memory-steps", type=int, default=3, help="training steps in each memory subprocess")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads for this run and its workers (default: torch's); 1 is steadier "
        "on a CPU shared with other jobs",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--ablations", action="store_true")
    g.add_argument("--sweep", action="store_true")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/train_<device>[_mode].json)")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run(
    mode: str,
    shape_names: list[str],
    device: torch.device,
    precision: str,
    *,
    steps: int,
    rounds: int,
    warmup: int,
    memory: int,
    overrides: dict | None = None,
) -> dict:
    """Runs one mode ("main" | "ablations" | "sweep") over the named shapes (with `overrides` such as
    {"batch": 1} applied to each); steps=0 measures memory only, memory=0 skips it (else: steps per memory
    worker). Returns the JSON payload."""
    shapes = {name: replace(SHAPES[name], **(overrides or {})) for name in shape_names}
    opts = dict(steps=steps, rounds=rounds, warmup=warmup, memory=memory)
    peak = matmul_peak(device, torch.bfloat16 if precision == "bf16" else torch.float32)
    print(
        f"{device_name(device)}: measured {peak['dtype']} matmul peak {peak['flops_per_s'] / 1e12:.2f} TFLOP/s",
        flush=True,
    )
    payload = environment(device, precision) | {
        "benchmark": "bench.train",
        "mode": mode,
        "matmul_peak": peak,
        "shapes": {name: asdict(shape) for name, shape in shapes.items()},
        "timing": {
            **opts,
            "method": "cuda events per step, one sync per block of steps"
            if device.type == "cuda"
            else "perf_counter and process_time per step, contenders interleaved step by step",
            "statistic": "median over all timed steps of all rounds, rounds interleaved",
        },
        "memory_method": (
            f"fresh subprocess per contender: torch.cuda.max_memory_allocated/reserved over {memory} steps"
            if device.type == "cuda"
            else f"fresh subprocess per contender: peak RSS during {memory} steps minus RSS after build "
            "(VmHWM reset through /proc/self/clear_refs); saved = unique storages packed by "
            "saved_tensors_hooks in one forward+loss, parameters excluded"
        ),
        "results": [],
    }
    for name, base in shapes.items():
        if mode == "sweep":
            for axis, shape, rank in sweep_shapes(base):
                s = Spec(rank=rank)
                res = compare(shape, [(s, s.peer())], device, precision, peak=peak, **opts)
                payload["results"].append(res | {"shape_name": name, "axis": axis, "rank": rank})
                print(table(res, device), flush=True)
        else:
            pairs = ablation_pairs(device) if mode == "ablations" else main_pairs()
            res = compare(base, pairs, device, precision, peak=peak, **opts)
            if mode == "ablations" and steps:  # each switch against our default, the row that has none
                ref = next(r for r in res["rows"] if r["spec"]["side"] == "ours")
                res["vs_ours_default"] = {
                    r["label"]: r["tokens_per_s"] / ref["tokens_per_s"]
                    for r in res["rows"]
                    if r["spec"]["side"] == "ours"
                }
            payload["results"].append(res | {"shape_name": name})
            print(f"\n### {name}: {base}  ({device_name(device)}, {precision}, {torch.get_num_threads()} threads)")
            print(table(res, device), flush=True)
            for label, x in res.get("vs_ours_default", {}).items():
                print(f"  {label:32s} {x:.2f}x our default")
    return payload


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._worker:
        print(json.dumps(memory_worker(json.loads(args._worker))))
        return {}
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False; use --device cpu")
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    mode = "ablations" if args.ablations else "sweep" if args.sweep else "main"
    gpu_default = ["gpu-2048"] if mode != "main" else ["gpu-512", "gpu-2048"]
    shapes = args.shape or (gpu_default if device.type == "cuda" else ["cpu"])
    steps = args.steps if args.steps is not None else 10 if args.sweep else 20
    overrides = {k: v for k, v in (("batch", args.batch), ("seq", args.seq)) if v is not None}
    payload = run(
        mode,
        shapes,
        device,
        precision,
        steps=steps,
        rounds=args.rounds,
        warmup=args.warmup,
        memory=0 if args.no_memory else args.memory_steps,
        overrides=overrides,
    )
    suffix = "" if mode == "main" else f"_{mode}"
    out = Path(args.out) if args.out else RESULTS / f"train_{device.type}{suffix}.json"
    print(f"wrote {write_json(payload, out)}")
    return payload


if __name__ == "__main__":
    main()
