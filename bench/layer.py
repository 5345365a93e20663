"""One layer's LoRA training step: frozen nn.Linear (floor) vs naive two-matmul LoRA vs LoRALinear vs PEFT.

    python -m bench.layer                      # CPU default subset (d=768), float32
    python -m bench.layer --device cuda --dtype bfloat16    # full grid
    python -m bench.layer --tokens 8192 --dims 768 --ranks 16 --steps 40

A step is forward + backward with grads for x, lora_A, lora_B (base frozen); the floor is the frozen
nn.Linear's forward + backward, which computes grad_x only. All implementations run in one process,
interleaved (A B C D A B C D ...), so load from other processes hits them alike; the figure is the
median over the timed steps. float32 runs everything in fp32. bfloat16/float16 is the mixed-precision
setup: base weight, x and grads in that dtype, LoRA A/B fp32 masters, under torch.autocast.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from data.cache import write_json_atomic
from lora import LoRALinear
from training.distributed import device_name

ALPHA = 32.0
FULL = {"tokens": [2048, 8192], "dims": [768, 2048, 4096], "ranks": [8, 16, 64]}
# d=2048 takes ~1 min per shape on a 2-core CPU and d=4096 several; the CPU default keeps d=768.
CPU_DEFAULT = {"tokens": [2048, 8192], "dims": [768], "ranks": [8, 16, 64]}
QUICK = {"tokens": [2048], "dims": [768], "ranks": [16]}


class NaiveLoRA(nn.Module):
    """The textbook form: base(x) + s * (x A^T) B^T, plain autograd."""

    def __init__(self, base: nn.Linear, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float):
        super().__init__()
        self.base, self.scaling = base, scaling
        self.lora_A, self.lora_B = nn.Parameter(lora_A.clone()), nn.Parameter(lora_B.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = x.dtype if not torch.is_autocast_enabled(x.device.type) else torch.get_autocast_dtype(x.device.type)
        lora = F.linear(F.linear(x, self.lora_A.to(dt)), self.lora_B.to(dt))
        return self.base(x) + lora * self.scaling


def build(d: int, rank: int, device: str, dtype: torch.dtype) -> dict[str, nn.Module]:
    """The implementations over one shared frozen base and identical (non-zero) A, B."""
    base = nn.Linear(d, d, device=device, dtype=dtype).requires_grad_(False)
    lora_A = torch.randn(rank, d, device=device) / d**0.5
    lora_B = torch.randn(d, rank, device=device) / rank**0.5 * 0.1
    ours = LoRALinear(base, rank=rank, alpha=ALPHA)
    with torch.no_grad():
        ours.lora_A.copy_(lora_A)
        ours.lora_B.copy_(lora_B)
    impls = {"floor": base, "naive": NaiveLoRA(base, lora_A, lora_B, ours.scaling), "ours": ours}
    try:
        from peft import LoraConfig
        from peft.tuners.lora import Linear as PeftLinear
    except ImportError:
        return impls
    peft = PeftLinear(base, "default", config=LoraConfig(r=rank, lora_alpha=ALPHA), r=rank, lora_alpha=ALPHA)
    with torch.no_grad():
        peft.lora_A["default"].weight.data = lora_A.clone()
        peft.lora_B["default"].weight.data = lora_B.clone()
    base.requires_grad_(False)
    impls["peft"] = peft
    return impls


def trainable(m: nn.Module) -> list[torch.Tensor]:
    return [p for p in m.parameters() if p.requires_grad]


def make_step(m: nn.Module, x: torch.Tensor, g: torch.Tensor, autocast: bool) -> Callable[[], torch.Tensor]:
    params = trainable(m)

    def step() -> torch.Tensor:
        x.grad = None
        for p in params:
            p.grad = None
        with torch.autocast(x.device.type, dtype=x.dtype, enabled=autocast):
            y = m(x)
        y.backward(g)
        return y

    return step


def check(impls: dict[str, nn.Module], x: torch.Tensor, g: torch.Tensor, autocast: bool) -> None:
    """Every implementation's output (and, for LoRA ones, grads) against the naive one, before timing."""
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}[x.dtype]

    def run(m):
        y = make_step(m, x, g, autocast)().detach().float()
        return [y, x.grad.float()] + [p.grad.float() for p in trainable(m)]

    want = run(impls["naive"])
    for name, m in impls.items():
        got = run(m)
        pairs = zip(got, want) if name != "floor" else [(got[0], None)]
        for i, (a, b) in enumerate(pairs):
            if b is None:
                continue
            err = (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)
            if err > tol:
                raise AssertionError(f"{name}: tensor {i} differs from naive by {err:.2e} (relative), tol {tol}")


def timer(device: str) -> Callable[[Callable[[], object]], float]:
    """Milliseconds for one call; CUDA uses events and waits for the GPU, CPU a wall clock."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def cuda_ms(fn):
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)

        return cuda_ms

    def cpu_ms(fn):
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    return cpu_ms


def bench_shape(n: int, d: int, rank: int, device: str, dtype: torch.dtype, warmup: int, steps: int) -> dict:
    torch.manual_seed(0)
    impls = build(d, rank, device, dtype)
    autocast = dtype != torch.float32
    x = torch.randn(n, d, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(n, d, device=device, dtype=dtype)
    check(impls, x, g, autocast)
    steps_fn = {k: make_step(m, x, g, autocast) for k, m in impls.items()}
    measure = timer(device)
    times: dict[str, list[float]] = {k: [] for k in impls}
    for i in range(warmup + steps):
        for k, fn in steps_fn.items():  # interleaved: A B C D A B C D ...
            t = measure(fn)
            if i >= warmup:
                times[k].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    q = {k: statistics.quantiles(v, n=4) for k, v in times.items()}
    return {
        "tokens": n,
        "d": d,
        "rank": rank,
        "median_ms": med,
        "iqr_ms": {k: [v[0], v[2]] for k, v in q.items()},
        "x_floor": {k: v / med["floor"] for k, v in med.items()},
        "x_peft": {k: v / med["peft"] for k, v in med.items()} if "peft" in med else None,
    }


def profile(n: int, d: int, rank: int, device: str, dtype: torch.dtype) -> None:
    """torch.profiler tables of one step for the floor, ours and PEFT: where the time goes."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    torch.manual_seed(0)
    impls = build(d, rank, device, dtype)
    x = torch.randn(n, d, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(n, d, device=device, dtype=dtype)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    for name in ("floor", "ours", "peft", "naive"):
        if name not in impls:
            continue
        fn = make_step(impls[name], x, g, dtype != torch.float32)
        for _ in range(3):
            fn()
        with prof(activities=acts) as p:
            for _ in range(5):
                fn()
        key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
        print(f"\n== {name}: N={n} d={d} r={rank}, 5 steps ==")
        print(p.key_averages().table(sort_by=key, row_limit=12))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--quick", action="store_true", help="one small shape (N=2048, d=768, r=16)")
    ap.add_argument("--tokens", type=int, nargs="+", help="token counts N (default: the grid for the device)")
    ap.add_argument("--dims", type=int, nargs="+", help="d_in = d_out (CPU default: 768; CUDA: 768 2048 4096)")
    ap.add_argument("--ranks", type=int, nargs="+", help="LoRA ranks (default 8 16 64)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's, all cores)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per implementation (>= 20)")
    ap.add_argument("--profile", action="store_true", help="print torch.profiler tables for the first shape")
    ap.add_argument("--out", type=Path, help="JSON path (default bench/results/layer_<device>_<dtype>.json)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch")
    if args.dtype == "float16" and args.device == "cpu":
        raise SystemExit("--dtype float16 is CUDA-only here (CPU autocast is bfloat16)")
    if args.steps < 20:
        raise SystemExit("--steps must be >= 20 so the median means something")
    grid = QUICK if args.quick else (FULL if args.device == "cuda" else CPU_DEFAULT)
    tokens, dims, ranks = args.tokens or grid["tokens"], args.dims or grid["dims"], args.ranks or grid["ranks"]
    dtype = getattr(torch, args.dtype)
    if args.profile:
        profile(tokens[0], dims[0], ranks[0], args.device, dtype)
        return None

    rows = []
    header = f"{'N':>6} {'d':>5} {'r':>3} | " + " ".join(f"{k:>9}" for k in ("floor", "naive", "ours", "peft"))
    print(
        f"{device_name(torch.device(args.device))}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{args.dtype}; median ms (x floor) [x PEFT for ours]"
    )
    print(header)
    for n in tokens:
        for d in dims:
            for r in ranks:
                row = bench_shape(n, d, r, args.device, dtype, args.warmup, args.steps)
                rows.append(row)
                cells = [f"{row['median_ms'][k]:7.2f}({row['x_floor'][k]:.2f}x)" for k in row["median_ms"]]
                vs = f"  ours/peft={row['x_peft']['ours']:.3f}" if row["x_peft"] else ""
                print(f"{n:>6} {d:>5} {r:>3} | " + " ".join(cells) + vs, flush=True)

    out = args.out or Path(__file__).parent / "results" / (
        f"layer_{args.device}_{args.dtype}"
        f"{f'_t{args.threads}' if args.threads else ''}{'_quick' if args.quick else ''}.json"
    )
    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    meta = {
        "device": device_name(torch.device(args.device)),
        "device_type": args.device,
        "torch": torch.__version__,
        "peft": peft_version,
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "warmup": args.warmup,
        "steps": args.steps,
        "alpha": ALPHA,
        "shapes": {"tokens": tokens, "dims": dims, "ranks": ranks},
        "results": rows,
    }
    write_json_atomic(out, meta)
    print(f"wrote {out}")
    return meta


if __name__ == "__main__":
    main()
