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

    assert losses(tmp_path / "two", "train_loss") == pytest.approx(losses(tmp_path / "one", "train_loss"), rel=1e-5)
    assert losses(tmp_path / "two", "val_loss") == pytest.approx(losses(tmp_path / "one", "val_loss"), rel=1e-5)
    a = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
