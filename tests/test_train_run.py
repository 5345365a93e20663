"""train_run end to end on toy corpora: result row, adapter, metrics, divergence, OOM, resume, W&B, the base cache."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from experiments.base import pretrain
from experiments.finetune.row import RESULT_KEYS
from experiments.finetune.train import train_run
from model import GPT
from training import loop


@pytest.fixture(scope="module")
def tmp(tmp_path_factory, toy_corpora, run_workspace):
    """Toy corpora and one cache for the module, so the toy base is pretrained once."""
    root = tmp_path_factory.mktemp("train_run")
    toy_corpora(root)
    with run_workspace(root):
        yield root


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_trains_an_adapter_and_records_everything(tmp, tiny_config):
    cfg = tiny_config(tmp)
    run_dir = tmp / "runs" / "ok"
    r = train_run(cfg, run_dir, progress=False)
    assert set(r) == set(RESULT_KEYS)
    assert r["status"] == "ok" and r["error"] is None and r["diverged_step"] is None, r["error"]
    assert json.loads((run_dir / "result.json").read_text()) == json.loads(json.dumps(r))
    # fine-tuning moves validation perplexity on the fine-tuning corpus
    assert r["val_ppl"] < 0.9 * r["base_val_ppl"], (r["base_val_ppl"], r["val_ppl"])
    assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"])) and r["best_val_loss"] <= r["val_loss"]
    assert r["steps"] == 12 and r["train_tokens"] == 12 * 256
    assert r["train_time_s"] > 0 and r["tokens_per_s"] == pytest.approx(r["train_tokens"] / r["train_time_s"])
    assert 0 < r["trainable_params"] < r["total_params"]
    assert r["trainable_params"] == 2 * 2 * (4 * 32 + 32 * 4)  # 2 layers x (q, v) x (A + B)
    assert r["peak_rss_bytes"] > 0 and r["saved_for_backward_bytes"] > 0 and r["peak_allocated_bytes"] is None
    assert r["device"].startswith("cpu") and r["dtype"] == "float32" and r["world_size"] == 1
    assert r["corpus_fingerprint"] and r["base_fingerprint"]
    # the adapter holds LoRA tensors only, in PEFT's layout
    keys = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)
    assert json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["r"] == 4
    recs = read_metrics(run_dir)
    assert [x["step"] for x in recs if "train_loss" in x] == list(range(1, 13))
    assert [x["step"] for x in recs if "val_loss" in x] == [0, 12]
    assert not (run_dir / "checkpoint.pt").exists()


def test_nan_loss_is_reported_as_diverged_with_its_step(tmp, monkeypatch, tiny_config):
    real = GPT.loss
    calls = {"n": 0}

    def poisoned(self, x, y, *a, **k):
        loss = real(self, x, y, *a, **k)
        if self.training and torch.is_grad_enabled():
            calls["n"] += 1  # pass 1 measures memory; then 2 micro-batches per step: pass 1 + 2*4 + 1 is step 5
            if calls["n"] >= 1 + 2 * 4 + 1:
                return loss * float("inf")
        return loss

    monkeypatch.setattr(GPT, "loss", poisoned)
    r = train_run(tiny_config(tmp), tmp / "runs" / "nan", progress=False)
    assert r["status"] == "diverged" and r["diverged_step"] == 5 and r["steps"] == 4
    assert r["val_loss"] is None and r["base_val_loss"] is not None
    assert json.loads((tmp / "runs" / "nan" / "result.json").read_text())["status"] == "diverged"
    assert not (tmp / "runs" / "nan" / "adapter").exists()


def test_oom_and_errors_become_statuses(tmp, monkeypatch, tiny_config):
    def oom(self, *a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with monkeypatch.context() as mp:
        mp.setattr(GPT, "loss", oom)
        r = train_run(tiny_config(tmp), tmp / "runs" / "oom", progress=False)
    assert r["status"] == "oom" and "out of memory" in r["error"]
    no_tok = tmp / "no_tokenizer"
    no_tok.mkdir()
    r = train_run(tiny_config(tmp, model={"base": str(no_tok)}), tmp / "runs" / "bad", progress=False)
    assert r["status"] == "failed" and "tokenizer.json" in r["error"]
    assert json.loads((tmp / "runs" / "bad" / "result.json").read_text())["status"] == "failed"


def test_resume_after_interruption_matches_a_straight_run(tmp, monkeypatch, tiny_config):
    cfg = tiny_config(tmp, train={"checkpoint_every": 4}, lora={"dropout": 0.1}, eval={"every_steps": 4})
    straight = train_run(cfg, tmp / "runs" / "straight", progress=False)

    real_save = loop.save_checkpoint

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        if args[4]["step"] == 8:
            raise KeyboardInterrupt  # killed right after the step-8 checkpoint

    run_dir = tmp / "runs" / "resumed"
    with monkeypatch.context() as mp:
        mp.setattr(loop, "save_checkpoint", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            train_run(cfg, run_dir, progress=False)
    assert (run_dir / "checkpoint.pt").exists() and not (run_dir / "result.json").exists()
    resumed = train_run(cfg, run_dir, resume=True, progress=False)

    same = ("status", "val_loss", "best_val_loss", "base_val_loss", "steps", "train_tokens")
    assert {k: resumed[k] for k in same} == {k: straight[k] for k in same}
    a = load_file(str(tmp / "runs" / "straight" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # the metrics file reads as one uninterrupted run (throughput aside)
    def strip(recs):
        return [{k: v for k, v in x.items() if k != "tokens_per_s"} for x in recs]

    assert strip(read_metrics(run_dir)) == strip(read_metrics(tmp / "runs" / "straight"))


def test_wandb_offline_run_is_written(tmp, monkeypatch, tiny_config):
    monkeypatch.setenv("WANDB_PROJECT", "slm-lora-test")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp / "runs" / "wandb"
    r = train_run(
        tiny_config(tmp, train={"tokens": 256 * 3}), run_dir, group="toy_ablation", run_name="toy", progress=False
    )
    assert r["status"] == "ok"
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert (run_dir / "wandb_id.txt").read_text().strip() in runs[0].name


def test_wandb_missing_warns_once_and_runs(tmp, monkeypatch, capsys, tiny_config):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *a, **k):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    monkeypatch.setenv("WANDB_PROJECT", "slm-lora-test")
    r = train_run(tiny_config(tmp, train={"tokens": 256}), tmp / "runs" / "nowandb", progress=False)
    assert r["status"] == "ok"
    err = capsys.readouterr().err
    assert err.count("WANDB_PROJECT is set but wandb is not installed") == 1


def test_base_is_cached_and_reused(tmp, monkeypatch, tiny_config):
    cfg = tiny_config(tmp)
    folder = pretrain.ensure_base(cfg, progress=False)  # built by an earlier test, or now
    files = {"config.json", "model.safetensors", "tokenizer.json", "pretrain.json", "source_val.npy"}
    assert files <= {p.name for p in folder.iterdir()}
    summary = json.loads((folder / "pretrain.json").read_text())
    assert summary["val_loss"] < summary["val_loss_init"] - 1.0  # the toy base learned something

    def no_pretraining(*a, **k):
        raise AssertionError("the cached base should have been reused")

    monkeypatch.setattr(pretrain, "pretrain_base", no_pretraining)
    assert pretrain.ensure_base(cfg, progress=False) == folder
    assert pretrain.ensure_base(tiny_config(tmp, lora={"rank": 8}), progress=False) == folder  # not part of the key
    with pytest.raises(AssertionError, match="reused"):  # a different base config is a different base
        pretrain.ensure_base(tiny_config(tmp, pretrain={"lr": 5e-3}), progress=False)
    assert not (folder.parent / f"{folder.name}.partial").exists()  # the finished base left no work folder behind


def test_activation_checkpointing_and_bf16_autocast(tmp, tiny_config):
    """Checkpointing recomputes blocks in backward: same numbers, far fewer bytes saved for backward."""
    plain = train_run(tiny_config(tmp, train={"tokens": 256 * 3}), tmp / "runs" / "plain", progress=False)
    ckpt = train_run(
        tiny_config(tmp, train={"tokens": 256 * 3, "activation_checkpointing": True}),
        tmp / "runs" / "ckpt",
        progress=False,
    )
    assert ckpt["status"] == plain["status"] == "ok"
    assert ckpt["val_loss"] == pytest.approx(plain["val_loss"], rel=1e-6)
    assert ckpt["saved_for_backward_bytes"] < 0.5 * plain["saved_for_backward_bytes"]
    bf16 = train_run(
        tiny_config(tmp, train={"tokens": 256 * 3, "dtype": "bfloat16"}), tmp / "runs" / "bf16", progress=False
    )
    assert bf16["status"] == "ok" and bf16["dtype"] == "bfloat16 autocast"
    # a bf16 run fine-tunes a base pretrained in bf16 (precision is part of the base's cache key): compare the gains
    gain16, gain32 = bf16["base_val_loss"] - bf16["val_loss"], plain["base_val_loss"] - plain["val_loss"]
    assert gain16 == pytest.approx(gain32, abs=0.05), (bf16, plain)
