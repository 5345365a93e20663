"""bench/gpu_check.sh: without a GPU one line and exit 0; with one (a stand-in interpreter that claims a GPU) every
step in order with flags the real command lines accept, a failing step reported while the rest still run; and the
target verdicts."""

import json
import subprocess
from pathlib import Path

import pytest
import torch

from bench.layer import parse_args as layer_args
from bench.targets import main as targets_main
from bench.train.cli import parse_args as train_args
from experiments.run import build_parser as run_parser

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "gpu_check.sh"


def gpu_check(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, text=True, capture_output=True, timeout=120, env=env)


# A stand-in for python: claims a GPU, records each call (one argument per line, then the cache it was given), makes
# bench.layer fail, and writes a report where experiments.run is told to.
FAKE_PYTHON = """#!/usr/bin/env bash
{ printf '%s\\n' "$@"; echo "SLM_LORA_CACHE=${SLM_LORA_CACHE:-}"; echo ---; } >> "$CALLS"
case "$*" in
    *get_device_name*) echo "NVIDIA Fake GPU 80GB" ;;
    "-m bench.layer"*) echo "layer broke" >&2; exit 3 ;;
    "-m experiments.run"*) mkdir -p "${@: -1}/plots" && echo "# report" > "${@: -1}/report.md" ;;
esac
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the script would run for real")
def test_without_cuda_it_says_so_in_one_line_and_does_nothing():
    before = sorted(p.name for p in (REPO / "bench" / "results").iterdir())
    done = gpu_check()
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "gpu_check: no CUDA device (torch.cuda.is_available() is False), nothing to do."
    ]
    assert sorted(p.name for p in (REPO / "bench" / "results").iterdir()) == before


def test_an_unknown_step_is_refused_before_anything_runs():
    done = gpu_check("tests", "bench")
    assert done.returncode == 2 and done.stdout == ""
    assert "unknown step 'bench'; the steps are: tests layer train quick targets" in done.stderr


def test_with_a_gpu_every_step_runs_in_order_and_a_failure_does_not_stop_the_rest(tmp_path):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    results = tmp_path / "results"
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHON": str(fake),
        "CALLS": str(tmp_path / "calls"),
        "GPU_CHECK_RESULTS": str(results),
    }
    done = gpu_check(env=env)
    assert done.returncode == 1, done.stdout + done.stderr
    tag = "cuda_nvidia-fake-gpu-80gb"
    summary = done.stdout[done.stdout.index("=== gpu_check summary (NVIDIA Fake GPU 80GB)") :].splitlines()[1:]
    assert [line.split(" (")[0].strip() for line in summary] == [
        "tests: passed",
        "layer: FAILED, exit 3",
        "train: passed",
        "quick: passed",
        "targets: passed",
        "gpu_check: 1 step(s) failed: layer",
    ]
    assert "layer broke" in (results / f"gpu_check_{tag}.log").read_text()
    assert (results / f"quick_{tag}" / "report.md").read_text() == "# report\n"
    calls = [c.strip("\n").split("\n") for c in (tmp_path / "calls").read_text().split("---\n")[:-1]]
    modules = [c[1] for c in calls if c[0] == "-m"]
    assert modules == ["pytest", "bench.layer", "bench.train", "experiments.run", "bench.targets"]
    argv = {c[1]: c[2:-1] for c in calls if c[0] == "-m"}
    assert argv["pytest"][:2] == ["-m", "cuda"] and f"--junitxml={results}/tests_{tag}.xml" in argv["pytest"]
    # the flags are those the real command lines accept
    layer = layer_args(argv["bench.layer"])
    assert (layer.device, layer.dtype, layer.out) == ("cuda", "bfloat16", results / f"layer_bfloat16_{tag}.json")
    train = train_args(argv["bench.train"])
    assert (train.device, train.precision, train.shape) == ("cuda", "bf16", ["gpu-512", "gpu-2048"])
    assert train.out == f"{results}/train_{tag}.json"
    run = run_parser().parse_args(argv["experiments.run"])
    assert run.quick and run.overrides == ["train.device=cuda"] and run.config is None
    cache = [c[-1] for c in calls if c[:2] == ["-m", "experiments.run"]][0]
    assert cache.startswith("SLM_LORA_CACHE=/") and not Path(cache.split("=", 1)[1]).exists()  # private, removed
    assert argv["bench.targets"] == ["--layer", argv["bench.layer"][-1], "--train", train.out]


def layer_file(tmp_path, ours_ms: float) -> Path:
    rows = [
        {"tokens": 2048, "d": 4096, "rank": 16, "median_ms": {"floor": 1.0, "ours": 9.0, "peft": 9.0}},
        {
            "tokens": 8192,
            "d": 4096,
            "rank": 16,
            "median_ms": {"floor": 2.0, "naive": 3.0, "ours": ours_ms, "peft": 2.5},
        },
    ]
    path = tmp_path / "layer.json"
    path.write_text(json.dumps({"results": rows}))
    return path


def train_file(tmp_path, seq: int) -> Path:
    def row(label, side, mfu):
        return {"label": label, "spec": {"side": side}, "mfu": mfu}

    result = {
        "shape": {"seq": seq},
        "rows": [row("ours lora qv", "ours", 0.45), row("peft lora qv", "peer", 0.2), row("ours full", "ours", 0.38)],
        "ratios": [
            {"ours": "ours lora qv", "peer": "peft lora qv", "speedup": 1.6, "peak_allocated_ratio": 0.7},
            {"ours": "ours full", "peer": "hf full", "speedup": 1.1, "peak_allocated_ratio": 0.9},
        ],
    }
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"results": [result]}))
    return path


def test_targets_read_the_issue_shapes_and_say_held_or_missed(tmp_path):
    text = targets_main(["--layer", str(layer_file(tmp_path, 2.1)), "--train", str(train_file(tmp_path, 2048))])
    lines = text.splitlines()
    assert "| layer x frozen floor, N=8192 d=4096 r=16 | ours | 1.050 | <= 1.06 | held |" in lines
    assert "| layer speed-up over PEFT, N=8192 d=4096 r=16 | ours | 1.190 | >= 1.15 | held |" in lines
    assert "| step speed-up over PEFT, seq 2048 | ours lora qv | 1.600 | >= 1.5 | held |" in lines
    assert "| peak allocated x PEFT, seq 2048 | ours lora qv | 0.700 | <= 0.6 | did not hold |" in lines
    assert "| MFU, seq 2048 | ours lora qv | 0.450 | >= 0.4 | held |" in lines
    assert "| MFU, seq 2048 | ours full | 0.380 | >= 0.4 | did not hold |" in lines
    assert {line.split(" | ")[1] for line in lines[6:]} == {"ours lora qv", "ours full"}  # no peer, no full pair
    assert len(lines) == 4 + 2 + 2 + 2  # header, the two layer targets, speed and memory of the one LoRA pair, 2 MFU


def test_targets_say_not_measured_where_the_files_lack_the_shape(tmp_path, capsys):
    slow = targets_main(["--layer", str(layer_file(tmp_path, 2.2)), "--train", str(train_file(tmp_path, 512))])
    assert "| layer x frozen floor, N=8192 d=4096 r=16 | ours | 1.100 | <= 1.06 | did not hold |" in slow
    assert slow.splitlines()[-1] == "| step speed-up over PEFT, seq 2048 | ours lora | — | >= 1.5 | not testable |"
    with pytest.raises(SystemExit):
        targets_main(["--layer", str(tmp_path / "missing.json"), "--train", str(tmp_path / "train.json")])
    assert "missing.json: no such file; run the benchmark first" in capsys.readouterr().err
