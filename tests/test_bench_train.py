"""bench.train compares the same function on both sides, and its JSON has what readers need (tiny shape)."""

import json

import torch

from bench.train import run, write_json
from bench.train_measure import saved_for_backward
from bench.train_steps import SHAPES, Spec, build, copy_lora_A, make_batch, save_random_opt

CPU = torch.device("cpu")


def test_ours_and_peft_start_and_train_the_same(tmp_path):
    shape = SHAPES["tiny"]
    save_random_opt(shape, str(tmp_path))
    batch = make_batch(shape, CPU)
    spec = Spec(rank=4, alpha=8.0)
    ours = build(spec, shape, str(tmp_path), CPU, "fp32", batch)
    peer = build(spec.peer(), shape, str(tmp_path), CPU, "fp32", batch)
    assert copy_lora_A(peer, ours) == 2 * shape.n_layer
    assert ours.trainable == peer.trainable == 2 * shape.n_layer * 2 * 4 * shape.d_model
    with torch.no_grad():
        l0_ours, l0_peer = ours.loss_fn().item(), peer.loss_fn().item()
    assert abs(l0_ours - l0_peer) <= 1e-4
    for _ in range(2):
        a, b = ours.step().item(), peer.step().item()
        assert abs(a - b) <= 1e-4
    with torch.no_grad():  # after two AdamW steps B != 0: the adapters moved, identically on both sides
        l2_ours, l2_peer = ours.loss_fn().item(), peer.loss_fn().item()
    assert l2_ours != l0_ours and abs(l2_ours - l2_peer) <= 1e-4
    saved = saved_for_backward(ours.loss_fn, ours.model)
    assert saved["activations"] > 0


def test_run_writes_the_expected_json(tmp_path):
    payload = run("main", ["tiny"], CPU, "fp32", steps=2, rounds=1, warmup=0, memory=False)
    path = write_json(payload, tmp_path / "train_cpu.json")
    data = json.loads(path.read_text())
    for key in ("date", "device", "versions", "threads", "precision", "shapes", "timing", "matmul_peak", "results"):
        assert key in data, key
    assert set(data["versions"]) >= {"torch", "transformers", "peft"}
    assert data["shapes"]["tiny"]["d_model"] == SHAPES["tiny"].d_model
    (result,) = data["results"]
    labels = [row["label"] for row in result["rows"]]
    assert labels == ["ours lora qv", "peft lora qv", "ours lora all6", "peft lora all6", "ours full", "hf full"]
    for row in result["rows"]:
        assert row["tokens_per_s"] > 0 and row["timing"]["steps"] == 2 and row["flops_per_step"] > 0
    assert [r["peer"] for r in result["ratios"]] == ["peft lora qv", "peft lora all6", "hf full"]
    assert all(r["speedup"] > 0 for r in result["ratios"])
