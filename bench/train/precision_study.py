"""`python -m bench.train.precision_study`: does bf16 change what a study finds? float32 against bf16 autocast with the
fused LoRA path and with the two-matmul path, paired by (value, seed), on a lab study (default: the rank study).

Each (value, seed) of the study runs once per variant, the variants one after another for that pair (so machine load
hits all three alike and the time ratios are side by side). Every run is the lab's own `train_run` on the lab's
config (`train.dtype` set per variant; a bf16 variant fine-tunes the base pretrained in bf16, as `auto` does on a
bf16 CPU). The two-matmul variant sets `LoRALinear.fused = False` for its runs. Prints, per value and pooled over the
values, the paired difference of validation perplexity (mean ± 95 % t-interval over seeds, experiments.report.stats)
and the training-time ratio, and writes everything to a JSON file. Each variant's folder (WORK/<variant>) is also a
lab results folder, so `python -m experiments.report WORK/bf16-fused --compare WORK/float32` gives each precision's
tables and recommended values and their paired differences; a study started again reads its finished runs back.

    python -m bench.train.precision_study                       # abl_lora_rank.yaml, 3 seeds, all three variants
    python -m bench.train.precision_study --quick --seeds 2 --lora_rank 16   # a smoke run (not a finding); any
                                                # flag it does not know goes to the lab (--lora_rank, --set K=V)
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from data.cache import write_json_atomic
from experiments.config.config import Config, from_dict
from experiments.finetune.row import read_result
from experiments.finetune.train import train_run
from experiments.report.stats import paired
from experiments.run import build_parser, resolve_runs
from experiments.sweep.results import RESULTS_JSONL, append_row
from experiments.sweep.sweep import spec_row
from lora import LoRALinear
from training.distributed import device_name
from training.precision import cpu_bf16_units

RESULTS = Path(__file__).parents[1] / "results"
VARIANTS = {  # name -> (train.dtype, fused LoRA path)
    "float32": ("float32", True),
    "bf16-fused": ("bfloat16", True),
    "bf16-two-matmul": ("bfloat16", False),
}


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """This script's options, and the rest: flags for `python -m experiments.run` (--lora_rank 16, --set K=V)."""
    p = argparse.ArgumentParser(prog="python -m bench.train.precision_study", description=__doc__.split("\n")[0])
    p.add_argument(
        "--config",
        default="experiments/configs/abl_lora_rank.yaml",
        help="the lab study to run; 'default': the lab's default study (every ablation of `python -m experiments.run`)",
    )
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="the lab's --quick scale: a smoke run, not a finding")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument(
        "--work",
        type=Path,
        default=Path("bench_precision_runs"),
        help="WORK/<variant>/runs/<hash> per run; WORK/<variant> is then a lab results folder (experiments.report)",
    )
    p.add_argument("--out", type=Path, default=None, help="JSON (default bench/results/precision_study[_quick].json)")
    return p.parse_known_args(argv)


def run_variant(spec_cfg: Config, variant: str, run_dir: Path) -> dict:
    """One lab run of one variant; LoRALinear.fused is restored whatever happens. A run that already finished in
    `run_dir` (an interrupted study started again) is read back, not trained again."""
    done = read_result(run_dir)
    if done is not None and done.get("status") == "ok":
        return done
    dtype, fused = VARIANTS[variant]
    data = spec_cfg.to_dict()
    data["train"]["dtype"] = dtype
    cfg = from_dict(data, source=f"precision study, {variant}")
    saved = LoRALinear.fused
    LoRALinear.fused = fused
    try:
        return train_run(cfg, run_dir, progress=False)
    finally:
        LoRALinear.fused = saved


def summarize(rows: list[dict], variants: list[str]) -> dict:
    """Paired differences of val ppl against the first variant, and against bf16-fused for the two-matmul one."""
    ok = {(r["variant"], r["value"], r["seed"]): r for r in rows if r["status"] == "ok"}
    pairs = [(v, variants[0]) for v in variants[1:]]
    if "bf16-two-matmul" in variants and "bf16-fused" in variants:
        pairs.append(("bf16-two-matmul", "bf16-fused"))
    values = sorted({r["value"] for r in rows}, key=str)
    seeds = sorted({r["seed"] for r in rows})
    out: dict = {}
    for a, b in pairs:
        both = [(v, s) for v in values for s in seeds if (a, v, s) in ok and (b, v, s) in ok]
        per_value = {}
        for v in sorted({v for v, _ in both}, key=str):  # values with at least one pair of finished runs
            keys = [s for vv, s in both if vv == v]
            d = paired([ok[a, v, s]["val_ppl"] for s in keys], [ok[b, v, s]["val_ppl"] for s in keys])
            per_value[str(v)] = {"diff": d.diff, "half": d.half, "n": d.n, "significant": d.significant}
        # Pooled over distinct runs: a baseline shared by several ablations is one run, listed under each value.
        distinct = list({ok[a, v, s].get("config_hash", (v, s)): (v, s) for v, s in both}.values())
        d = paired([ok[a, v, s]["val_ppl"] for v, s in distinct], [ok[b, v, s]["val_ppl"] for v, s in distinct])
        times = [ok[a, v, s]["train_time_s"] / ok[b, v, s]["train_time_s"] for v, s in distinct]
        out[f"{a} - {b}"] = {
            "val_ppl_pooled": {"diff": d.diff, "half": d.half, "n": d.n, "significant": d.significant},
            "val_ppl_per_value": per_value,
            "train_time_ratio_median": statistics.median(times) if times else None,
        }
    return out


def main(argv: list[str] | None = None) -> dict:
    args, lab_flags = parse_args(argv)
    study = [] if args.config == "default" else ["--config", args.config]
    lab = [*study, "--seeds", str(args.seeds), *(["--quick"] if args.quick else []), *lab_flags]
    specs = resolve_runs(build_parser().parse_args(lab))
    device = torch.device("cpu") if not torch.cuda.is_available() else torch.device("cuda")
    print(f"{device_name(device)}; bf16 units: {cpu_bf16_units()}; {len(specs)} runs x {len(args.variants)} variants")
    rows = []
    t0 = time.perf_counter()
    done: dict[tuple[str, str], dict] = {}  # a baseline shared by several ablations of a study runs once
    for spec in specs:
        for variant in args.variants:
            key = (spec.config_hash, variant)
            if key not in done:
                done[key] = run_variant(spec.cfg, variant, spec.run_dir(args.work / variant))
            r = done[key]
            value = f"{spec.ablation}={spec.value}"
            rows.append({**r, "variant": variant, "value": value, "seed": spec.seed, "config_hash": spec.config_hash})
            print(
                f"{spec.name:28s} {variant:16s} {r['status']:8s} val ppl {r['val_ppl'] or float('nan'):9.3f} "
                f"train {r['train_time_s'] or float('nan'):7.1f} s  [{time.perf_counter() - t0:6.0f} s]",
                flush=True,
            )
    for variant in args.variants:  # each variant's runs as a lab results folder, rebuilt from its runs' results
        (args.work / variant / RESULTS_JSONL).unlink(missing_ok=True)
        for spec in specs:
            append_row(args.work / variant, spec_row(spec, args.work / variant, done[spec.config_hash, variant]))
    print(
        f"each variant's folder in {args.work} is a lab results folder: python -m experiments.report "
        f"{args.work / args.variants[-1]} --compare {args.work / args.variants[0]} --label {args.variants[-1]} "
        f"--compare-label {args.variants[0]}"
    )
    summary = summarize(rows, args.variants)
    for name, s in summary.items():
        pooled = s["val_ppl_pooled"]
        print(
            f"\n{name}: val ppl {pooled['diff']:+.3f} ± {pooled['half'] or float('nan'):.3f} (n={pooled['n']}, "
            f"significant: {pooled['significant']}), train time ratio {s['train_time_ratio_median']:.2f}"
        )
        for v, d in s["val_ppl_per_value"].items():
            print(f"  {v:>12s}: {d['diff']:+.3f} ± {d['half'] or float('nan'):.3f}")
    payload = {
        "benchmark": "bench.train.precision_study",
        "device": device_name(device),
        "cpu_bf16_units": cpu_bf16_units(),
        "torch": torch.__version__,
        "config": args.config,
        "lab_flags": lab_flags,
        "quick": args.quick,
        "seeds": args.seeds,
        "variants": {v: {"dtype": VARIANTS[v][0], "fused": VARIANTS[v][1]} for v in args.variants},
        "rows": rows,
        "summary": summary,
        "wall_s": time.perf_counter() - t0,
    }
    out = args.out or RESULTS / f"precision_study{'_quick' if args.quick else ''}.json"
    write_json_atomic(out, payload)
    print(f"wrote {out}")
    return payload


if __name__ == "__main__":
    main()
