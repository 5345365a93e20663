"""`python -m bench.train`: one LoRA training step of our GPT + inject_lora vs transformers' OPT / Llama + PEFT.

Both sides load the same random-init OPT (for --shape smollm2-135m: Llama) checkpoint (saved to a temp folder),
see the same batch, precision, LoRA rank/alpha/targets, AdamW and dropout 0, and must agree on the initial loss before
anything is timed (`bench.train.compare`). Contenders: `bench.train.steps`; timing, FLOPs and the
matmul peak: `bench.train.measure`; memory, one fresh process per contender: `bench.train.memory`;
the printed table: `bench.train.table`. This file: the modes and the command line.

    python -m bench.train                 # the table: LoRA q,v / LoRA all six / full fine-tuning
    python -m bench.train --ablations     # our optimisations switched off one at a time
    python -m bench.train --sweep         # context 256..2048 and rank 4..64, ours vs PEFT
    python -m bench.train --shape smollm2-135m   # SmolLM2-135M's shape: LoRA q,v / all seven / full
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, replace
from pathlib import Path

import torch

from bench.train.compare import Budget, compare
from bench.train.measure import matmul_peak
from bench.train.steps import SHAPES, TARGETS_ALL, TARGETS_LLAMA_ALL, TARGETS_QV, Shape, Spec
from bench.train.table import environment, table
from data.cache import write_json_atomic
from training.distributed import device_name

RESULTS = Path(__file__).parents[1] / "results"


# ---------------------------------------------------------------- modes
def main_pairs(shape: Shape) -> list[tuple[Spec, Spec]]:
    """LoRA on q,v, LoRA on every Linear of a block (OPT's six, a Llama block's seven), full fine-tuning."""
    every = TARGETS_LLAMA_ALL if shape.arch == "llama" else TARGETS_ALL
    specs = [Spec(mode="lora", targets=TARGETS_QV), Spec(mode="lora", targets=every), Spec(mode="full")]
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
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument(
        "--shape",
        action="append",
        choices=sorted(SHAPES),
        help="repeatable: cpu (hidden 256, 4 layers, 8 x 256 tokens), gpu-512 / gpu-2048 (opt-125m, 32 x 512 / "
        "8 x 2048 tokens), smollm2-135m (Llama blocks, 2 x 512 tokens), tiny (tests); default cpu on a CPU, "
        "gpu-512 and gpu-2048 on a GPU",
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
    return p.parse_args(argv)


def run(
    mode: str,
    shape_names: list[str],
    device: torch.device,
    precision: str,
    budget: Budget,
    overrides: dict | None = None,
) -> dict:
    """Runs one mode ("main" | "ablations" | "sweep") over the named shapes (with `overrides` such as
    {"batch": 1} applied to each). Returns the JSON payload."""
    shapes = {name: replace(SHAPES[name], **(overrides or {})) for name in shape_names}
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
            **asdict(budget),
            "method": "cuda events per step, one sync per block of steps"
            if device.type == "cuda"
            else "perf_counter and process_time per step, contenders interleaved step by step",
            "statistic": "median over all timed steps of all rounds, rounds interleaved",
        },
        "memory_method": (
            f"fresh subprocess per contender: torch.cuda.max_memory_allocated/reserved over {budget.memory} steps"
            if device.type == "cuda"
            else f"fresh subprocess per contender: peak RSS during {budget.memory} steps minus RSS after build "
            "(VmHWM reset through /proc/self/clear_refs); saved = unique storages packed by "
            "saved_tensors_hooks in one forward+loss, parameters excluded"
        ),
        "results": [],
    }
    for name, base in shapes.items():
        if mode == "sweep":
            for axis, shape, rank in sweep_shapes(base):
                s = Spec(rank=rank)
                res = compare(shape, [(s, s.peer())], device, precision, budget, peak)
                payload["results"].append(res | {"shape_name": name, "axis": axis, "rank": rank})
                print(table(res, device), flush=True)
        else:
            pairs = ablation_pairs(device) if mode == "ablations" else main_pairs(base)
            res = compare(base, pairs, device, precision, budget, peak)
            if mode == "ablations" and budget.steps:  # each switch against our default, the row that has none
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
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False; use --device cpu")
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    mode = "ablations" if args.ablations else "sweep" if args.sweep else "main"
    gpu_default = ["gpu-2048"] if mode != "main" else ["gpu-512", "gpu-2048"]
    shapes = args.shape or (gpu_default if device.type == "cuda" else ["cpu"])
    budget = Budget(
        steps=args.steps if args.steps is not None else 10 if args.sweep else 20,
        rounds=args.rounds,
        warmup=args.warmup,
        memory=0 if args.no_memory else args.memory_steps,
    )
    overrides = {k: v for k, v in (("batch", args.batch), ("seq", args.seq)) if v is not None}
    payload = run(mode, shapes, device, precision, budget, overrides)
    suffix = "" if mode == "main" else f"_{mode}"
    out = Path(args.out) if args.out else RESULTS / f"train_{device.type}{suffix}.json"
    write_json_atomic(out, payload)
    print(f"wrote {out}")
    return payload
