"""`python -m bench.targets`: the GPU targets (bench/NOTES.md) against a bench.layer and a bench.train result.

    python -m bench.targets --layer bench/results/layer_bfloat16_cuda_<gpu>.json \
        --train bench/results/train_cuda_<gpu>.json

Prints a markdown table, one line per target and contender: the measured figure, the bound, and the verdict in the
report's words (experiments.report.checks: "held", "did not hold", or "not testable" where the file lacks the shape
or the figure, e.g. a CPU run). Exits 0 once both files are read:
a missed target is a finding to write up (and fix), not a broken run.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from experiments.report.checks import Check, Verdict
from experiments.report.fmt import EMPTY, md_table

LAYER_SHAPE = {"tokens": 8192, "d": 4096, "rank": 16}
LAYER_MAX_X_FLOOR = 1.06  # ours' step time / the frozen nn.Linear's
LAYER_MIN_VS_PEFT = 1.15  # PEFT's step time / ours'
TRAIN_SEQ = 2048
TRAIN_MIN_SPEEDUP = 1.5  # ours' tokens/s / transformers + PEFT's, LoRA
TRAIN_MAX_MEMORY = 0.6  # ours' peak allocated / theirs, LoRA
MIN_MFU = 0.40  # model FLOPs per second / the measured bf16 matmul peak


@dataclass(frozen=True)
class Target:
    """A figure a contender must reach: at most `bound` (`at_most`), else at least."""

    target: str
    contender: str
    bound: float
    at_most: bool

    def check(self, measured: float | None) -> Check:
        """The verdict on `measured` (None: the file has no such figure, e.g. no peak allocated on a CPU)."""
        bound = f"{'<=' if self.at_most else '>='} {self.bound}"
        if measured is None:
            return Check(bound, EMPTY, Verdict.NOT_TESTABLE)
        held = measured <= self.bound if self.at_most else measured >= self.bound
        return Check(bound, f"{measured:.3f}", Verdict.HELD if held else Verdict.NOT_HELD)


Judged = tuple[Target, Check]


def layer_checks(data: dict) -> list[Judged]:
    """One LoRA layer at N=8192, d=4096, r=16: against the frozen floor and against PEFT."""
    rows = [r for r in data["results"] if all(r[k] == v for k, v in LAYER_SHAPE.items())]
    ms = rows[0]["median_ms"] if rows else {}
    where = "N={tokens} d={d} r={rank}".format(**LAYER_SHAPE)
    floor = Target(f"layer x frozen floor, {where}", "ours", LAYER_MAX_X_FLOOR, True)
    peft = Target(f"layer speed-up over PEFT, {where}", "ours", LAYER_MIN_VS_PEFT, False)
    return [
        (floor, floor.check(ms["ours"] / ms["floor"] if ms else None)),
        (peft, peft.check(ms["peft"] / ms["ours"] if "peft" in ms else None)),
    ]


def train_checks(data: dict) -> list[Judged]:
    """The training step at seq 2048: speed-up and peak memory of each LoRA pair, MFU of each of our contenders."""
    where = f"seq {TRAIN_SEQ}"
    results = [r for r in data["results"] if r["shape"]["seq"] == TRAIN_SEQ]
    if not results:
        speed = Target(f"step speed-up over PEFT, {where}", "ours lora", TRAIN_MIN_SPEEDUP, False)
        return [(speed, speed.check(None))]
    checks = []
    for result in results:
        for r in result["ratios"]:
            if not r["ours"].startswith("ours lora"):
                continue
            speed = Target(f"step speed-up over PEFT, {where}", r["ours"], TRAIN_MIN_SPEEDUP, False)
            memory = Target(f"peak allocated x PEFT, {where}", r["ours"], TRAIN_MAX_MEMORY, True)
            checks += [(speed, speed.check(r["speedup"])), (memory, memory.check(r.get("peak_allocated_ratio")))]
        for row in result["rows"]:
            if row["spec"]["side"] == "ours":
                mfu = Target(f"MFU, {where}", row["label"], MIN_MFU, False)
                checks.append((mfu, mfu.check(row["mfu"])))
    return checks


def render(checks: list[Judged], sources: list[str]) -> str:
    rows = [[t.target, t.contender, c.observed, c.expected, c.text] for t, c in checks]
    table = md_table(["target", "contender", "measured", "bound", "verdict"], rows)
    return f"GPU targets (bench/NOTES.md) against {', '.join(sources)}\n\n{table}"


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
