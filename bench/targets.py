"""`python -m bench.targets`: issue 16's GPU targets against a bench.layer and a bench.train result file.

    python -m bench.targets --layer bench/results/layer_bfloat16_cuda_<gpu>.json \
        --train bench/results/train_cuda_<gpu>.json

Prints a markdown table, one line per target and contender: the measured figure, the bound, and whether it held
("not measured" where the file lacks the shape or the figure, e.g. a CPU run). Exits 0 once both files are read:
a missed target is a finding to write up (and fix), not a broken run.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

LAYER_SHAPE = {"tokens": 8192, "d": 4096, "rank": 16}
LAYER_MAX_X_FLOOR = 1.06  # ours' step time / the frozen nn.Linear's
LAYER_MIN_VS_PEFT = 1.15  # PEFT's step time / ours'
TRAIN_SEQ = 2048
TRAIN_MIN_SPEEDUP = 1.5  # ours' tokens/s / transformers + PEFT's, LoRA
TRAIN_MAX_MEMORY = 0.6  # ours' peak allocated / theirs, LoRA
MIN_MFU = 0.40  # model FLOPs per second / the measured bf16 matmul peak


@dataclass
class Check:
    target: str
    contender: str
    measured: float | None  # None: the file has no such figure (e.g. no peak allocated on a CPU)
    bound: float
    at_most: bool  # the measured figure must be <= bound (else >=)

    @property
    def verdict(self) -> str:
        if self.measured is None:
            return "not measured"
        held = self.measured <= self.bound if self.at_most else self.measured >= self.bound
        return "held" if held else "MISSED"


def layer_checks(data: dict) -> list[Check]:
    """One LoRA layer at N=8192, d=4096, r=16: against the frozen floor and against PEFT."""
    rows = [r for r in data["results"] if all(r[k] == v for k, v in LAYER_SHAPE.items())]
    ms = rows[0]["median_ms"] if rows else {}
    where = "N={tokens} d={d} r={rank}".format(**LAYER_SHAPE)
    return [
        Check(
            f"layer x frozen floor, {where}", "ours", ms["ours"] / ms["floor"] if ms else None, LAYER_MAX_X_FLOOR, True
        ),
        Check(
            f"layer speed-up over PEFT, {where}",
            "ours",
            ms["peft"] / ms["ours"] if "peft" in ms else None,
            LAYER_MIN_VS_PEFT,
            False,
        ),
    ]


def train_checks(data: dict) -> list[Check]:
    """The training step at seq 2048: speed-up and peak memory of each LoRA pair, MFU of each of our contenders."""
    where = f"seq {TRAIN_SEQ}"
    results = [r for r in data["results"] if r["shape"]["seq"] == TRAIN_SEQ]
    if not results:
        return [Check(f"step speed-up over PEFT, {where}", "ours lora", None, TRAIN_MIN_SPEEDUP, False)]
    checks = []
    for result in results:
        for r in result["ratios"]:
            if not r["ours"].startswith("ours lora"):
                continue
            checks.append(Check(f"step speed-up over PEFT, {where}", r["ours"], r["speedup"], TRAIN_MIN_SPEEDUP, False))
            checks.append(
                Check(
                    f"peak allocated x PEFT, {where}", r["ours"], r.get("peak_allocated_ratio"), TRAIN_MAX_MEMORY, True
                )
            )
        for row in result["rows"]:
            if row["spec"]["side"] == "ours":
                checks.append(Check(f"MFU, {where}", row["label"], row["mfu"], MIN_MFU, False))
    return checks


def render(checks: list[Check], sources: list[str]) -> str:
    lines = [
        f"Targets of issue 16 against {', '.join(sources)}",
        "",
        "| target | contender | measured | bound | verdict |",
        "|---|---|---|---|---|",
    ]
    for c in checks:
        measured = "-" if c.measured is None else f"{c.measured:.3f}"
        lines.append(
            f"| {c.target} | {c.contender} | {measured} | {'<=' if c.at_most else '>='} {c.bound} | {c.verdict} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(prog="python -m bench.targets", description=__doc__.split("\n")[0])
    p.add_argument("--layer", type=Path, required=True, help="a bench.layer JSON (bf16 on CUDA for the targets)")
    p.add_argument("--train", type=Path, required=True, help="a bench.train JSON of the main mode (gpu-2048 shape)")
    args = p.parse_args(argv)
    for path in (args.layer, args.train):
        if not path.is_file():
            p.error(f"{path}: no such file; run the benchmark first (bash bench/gpu_check.sh layer train)")
    layer, train = json.loads(args.layer.read_text()), json.loads(args.train.read_text())
    text = render(layer_checks(layer) + train_checks(train), [str(args.layer), str(args.train)])
    print(text)
    return text


if __name__ == "__main__":
    main()
