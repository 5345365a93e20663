"""DDP on CPU: two gloo processes under torchrun follow the same loss trajectory as one process with the same
global batch (the micro-batches of a step are split across processes, gradients averaged)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from experiments.base.pretrain import ensure_base
from experiments.finetune.train import train_run

REPO = Path(__file__).resolve().parents[1]


def losses(run_dir: Path, key: str) -> list[float]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in recs if key in r]


# Two processes against one, measured on CPU (Xeon, AMX, 2 cores): train losses differ by 1.2e-7 relative, validation
# losses by 7.9e-9 (the gradient average adds the same numbers in another order), adapter weights (|w| <= 0.2) by
# 3.0e-8 absolute. The bounds are ~4x that.
LOSS_RTOL = 5e-7
ADAPTER_ATOL = 1e-7


def test_two_gloo_processes_match_one_process(tmp_path, monkeypatch, tiny_config, toy_corpora):
    toy_corpora(tmp_path)
    monkeypatch.setenv("SLM_LORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    # 4 micro-batches of 2 sequences per step: 2 per process, so no_sync accumulation is exercised too.
    cfg = tiny_config(tmp_path, train={"micro_batch_tokens": 64, "tokens": 256 * 6})
    ensure_base(cfg, progress=False)  # built once here, so the two processes only read it

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = train_run(cfg, tmp_path / "one", progress=False)
    finally:
        torch.set_num_threads(threads)
    assert one["status"] == "ok", one["error"]

    cfg_file = tmp_path / "config.json"
    cfg_file.write_text(json.dumps(cfg.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "experiments.finetune",
            "--config-json",
            str(cfg_file),
            "--run-dir",
            str(tmp_path / "two"),
            "--no-progress",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "result.json").read_text())
    assert two["status"] == "ok", two["error"]
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["steps"] == one["steps"] == 6 and two["train_tokens"] == one["train_tokens"]

    for key in ("train_loss", "val_loss"):
        assert losses(tmp_path / "two", key) == pytest.approx(losses(tmp_path / "one", key), rel=LOSS_RTOL, abs=0)
    a = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=ADAPTER_ATOL)
