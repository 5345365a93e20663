"""`python -m bench.train.bf16_step`: the lab's own LoRA training step in each precision, side by side.

The step is what `training.loop` runs for one micro-batch: forward + `GPT.loss` under the run's autocast, backward,
AdamW (foreach) over A/B, zero_grad. Variants, all in one process on one batch, interleaved step by step:

- fp32: no autocast (train.dtype: float32).
- bf16-recast: bf16 autocast over float32 frozen weights (the lab before keep_frozen_in: every frozen weight is
  re-cast to bf16 on every call).
- bf16: bf16 autocast with the frozen linears kept in bf16 (training.precision.keep_frozen_in; what `auto` runs on
  a CPU with bf16 units), fused LoRA path.
- bf16-two-matmul: as bf16, with the two-matmul LoRA path (LoRALinear.fused = False).
- bf16-compiled: as bf16, with forward + loss under torch.compile (train.compile: true); its first step, the
  compilation, is timed on its own (`first_step_s`) against the run's length.

Prints ms/step, the ratio to fp32, tokens/s and MFU against the measured bf16 GEMM rate (bench.train.measure), and
with --profile the top ops of the bf16 step (torch.profiler, self CPU time). Shapes: `cpu` (the bench.train CPU
shape: hidden 256, 4 layers, 8 x 256 tokens) and `smollm2` (SmolLM2-135M: d 576, 30 Llama blocks, 9/3 heads,
FFN 1536, vocab 49152; 2 x 512 tokens), both random-init, LoRA rank 16 on q,v or --all-linear.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.train.measure import matmul_peak, time_steps
from bench.train.profile import profile_steps
from data.cache import write_json_atomic
from experiments.base.pretrain import base_gpt_config
from experiments.config.config import load_config
from lora import LoRAConfig, LoRALinear, inject_lora
from model import GPT, GPTConfig
from training.distributed import device_name
from training.precision import cpu_bf16_units, keep_frozen_in

RESULTS = Path(__file__).parents[1] / "results"


def _builtin() -> tuple[GPTConfig, int, int]:
    """The default study's fine-tuning step, read from the lab's defaults: the built-in base (at the tokenizer's
    largest vocabulary) and one micro-batch at the fine-tuning context."""
    cfg = load_config()
    seq = cfg.model.max_position_embeddings
    return base_gpt_config(cfg.pretrain, cfg.pretrain.vocab_size), cfg.train.micro_batch_tokens // seq, seq


SHAPES = {  # name -> (GPTConfig, batch, seq)
    "builtin": _builtin(),
    "cpu": (
        GPTConfig(vocab_size=8192, n_layer=4, n_head=4, d_model=256, d_ff=1024, max_position_embeddings=256),
        8,
        256,
    ),
    "smollm2": (
        GPTConfig(
            vocab_size=49152,
            n_layer=30,
            n_head=9,
            n_kv_head=3,
            d_model=576,
            d_ff=1536,
            max_position_embeddings=2048,
            norm="rmsnorm",
            mlp="gated",
            activation="silu",
            bias=False,
            rope_base=100000.0,
        ),
        2,
        512,
    ),
}
VARIANTS = ("fp32", "bf16-recast", "bf16", "bf16-two-matmul", "bf16-compiled")


def build(variant: str, cfg: GPTConfig, targets: list[str] | str, batch: tuple[torch.Tensor, torch.Tensor]):
    """One variant's model and its step (returns the loss tensor, no host sync)."""
    torch.manual_seed(0)
    model = GPT(cfg).train()
    inject_lora(model, LoRAConfig(rank=16, alpha=32.0, target_modules=targets))
    amp = None if variant == "fp32" else torch.bfloat16
    if variant in ("bf16", "bf16-two-matmul", "bf16-compiled"):
        keep_frozen_in(model, amp)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.fused = variant != "bf16-two-matmul"
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    x, y = batch
    loss_fn = torch.compile(model.loss) if variant == "bf16-compiled" else model.loss  # as train.compile: true

    def step() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp is not None):
            loss = loss_fn(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return model, step


def cpu_flags() -> list[str]:
    """The CPU's SIMD / matrix flags that bear on bf16 (Linux /proc/cpuinfo; empty elsewhere), for the results file."""
    info = Path("/proc/cpuinfo")
    line = next((x for x in info.read_text().splitlines() if x.startswith("flags")), "") if info.is_file() else ""
    return sorted(f for f in line.partition(":")[2].split() if f.startswith(("avx512", "amx", "avx2", "fma")))


def counted_flops(step: Callable[[], torch.Tensor]) -> int:
    """FLOPs of the matmuls one step executes (torch's FlopCounterMode: GEMMs, SDPA; the LoRA merge and the head's
    two GEMMs in GPT.loss included), the same for every variant up to the LoRA path's few thin GEMMs."""
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


def interleaved(steps: dict[str, Callable[[], torch.Tensor]], n: int, rounds: int, warmup: int) -> dict[str, float]:
    """Median seconds per step of each variant, timed one step at a time in rotating order."""
    times: dict[str, list[float]] = {k: [] for k in steps}
    names = list(steps)
    for r in range(rounds):
        for k in names:
            for _ in range(warmup):
                steps[k]()
        for i in range(n):
            j = (r + i) % len(names)
            for k in names[j:] + names[:j]:
                times[k] += time_steps(steps[k], 1, torch.device("cpu"))[0]
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.train.bf16_step", description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), action="append")
    p.add_argument("--all-linear", action="store_true", help="LoRA on every linear but the head (default: q,v)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant per round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--profile", action="store_true", help="also print the bf16 variant's top ops")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (1 is steadier on a busy CPU)")
    p.add_argument("--out", type=Path, default=None, help="JSON (default bench/results/bf16_step_cpu.json)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    targets: list[str] | str = "all-linear" if args.all_linear else ["q_proj", "v_proj"]
    peak = matmul_peak(torch.device("cpu"), torch.bfloat16)
    device = device_name(torch.device("cpu"))
    print(f"{device}; bf16 units: {cpu_bf16_units()}; bf16 GEMM peak {peak['flops_per_s'] / 1e12:.2f} TFLOP/s")
    results = []
    for name in args.shape or ["cpu"]:
        cfg, b, t = SHAPES[name]
        g = torch.Generator().manual_seed(0)
        tok = torch.randint(0, cfg.vocab_size, (b, t + 1), generator=g)
        batch = (tok[:, :-1].contiguous(), tok[:, 1:].contiguous())
        built = {v: build(v, cfg, targets, batch) for v in args.variants}
        first = {v: time_steps(s, 1, torch.device("cpu"))[0][0] for v, (_, s) in built.items()}  # compile included
        medians = interleaved({v: s for v, (_, s) in built.items()}, args.steps, args.rounds, args.warmup)
        flops = counted_flops(built[args.variants[0]][1])
        ref = medians.get("fp32")
        print(f"\n### {name}: {b} x {t} tokens, LoRA r16 on {targets}")
        rows = []
        for v, s in medians.items():
            row = {
                "variant": v,
                "first_step_s": first[v],
                "median_s": s,
                "tokens_per_s": b * t / s,
                "mfu_vs_bf16_peak": flops / s / peak["flops_per_s"],
                "speedup_vs_fp32": ref / s if ref else None,
            }
            rows.append(row)
            print(
                f"  {v:16s} {s * 1e3:8.1f} ms/step  {row['tokens_per_s']:8.0f} tok/s"
                f"  MFU {row['mfu_vs_bf16_peak']:5.1%}"
                + (f"  {row['speedup_vs_fp32']:.2f}x fp32" if ref else "")
                + f"  (first step {first[v]:.1f} s)"
            )
        if args.profile and "bf16" in built:
            table = profile_steps(built["bf16"][1], 3, torch.device("cpu"), 20)
            print(f"\n#### {name}, bf16 step: top ops by self CPU time\n{table}")
        results.append({"shape": name, "batch": b, "seq": t, "step_flops": flops, "config": asdict(cfg), "rows": rows})
        del built
    payload = {
        "benchmark": "bench.train.bf16_step",
        "device": device,
        "cpu_bf16_units": cpu_bf16_units(),
        "cpu_flags": cpu_flags(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "matmul_peak": peak,
        "targets": targets,
        "timing": {"steps": args.steps, "rounds": args.rounds, "warmup": args.warmup, "method": "interleaved, median"},
        "results": results,
    }
    out = args.out or RESULTS / "bf16_step_cpu.json"
    write_json_atomic(out, payload)
    print(f"wrote {out}")
    return payload


if __name__ == "__main__":
    main()
