"""`python -m bench.train.profile`: where one training step's time goes, ours vs transformers + PEFT.

torch.profiler over a few steps of each contender (after warm-up), top ops by self time. The
benchmark table says how fast; this says why.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from torch.profiler import ProfilerActivity, profile

from bench.train.steps import SHAPES, TARGETS_ALL, TARGETS_QV, Spec, build, make_batch, save_random_opt


def profile_steps(step, steps: int, device: torch.device, top: int, by_shape: bool = False) -> str:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=by_shape) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages(group_by_input_shape=by_shape).table(
        sort_by=key, row_limit=top, max_name_column_width=48, max_shapes_column_width=60
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.train.profile", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default=None)
    p.add_argument("--shape", default=None, choices=sorted(SHAPES))
    p.add_argument("--mode", default="lora", choices=["lora", "full"])
    p.add_argument("--all6", action="store_true", help="LoRA on all six linears instead of q,v")
    p.add_argument("--side", default="both", choices=["both", "ours", "peer"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--by-shape", action="store_true", help="group ops by input shapes")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    shape = SHAPES[args.shape or ("gpu-2048" if device.type == "cuda" else "cpu")]
    spec = Spec(mode=args.mode, targets=TARGETS_ALL if args.all6 else TARGETS_QV)
    with tempfile.TemporaryDirectory(prefix="bench_profile_") as folder:
        save_random_opt(shape, folder)
        batch = make_batch(shape, device)
        specs = {"ours": [spec], "peer": [spec.peer()], "both": [spec, spec.peer()]}[args.side]
        for s in specs:
            c = build(s, shape, folder, device, precision, batch)
            for _ in range(2):
                c.step()
            print(
                f"\n### {s.label}  {shape}  {precision}\n"
                f"{profile_steps(c.step, args.steps, device, args.top, args.by_shape)}"
            )
            del c


if __name__ == "__main__":
    main()
