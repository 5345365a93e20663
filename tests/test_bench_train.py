"""bench.train compares the same function on both sides, and its JSON has what readers need (tiny shape, CPU):
the main table, the ablations, the sweep, and the memory figures from their own process."""

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import transformers

import bench.train.cli
import bench.train.compare
from bench.train.cli import main, run, sweep_shapes
from bench.train.compare import Budget, compare, run_rounds
from bench.train.measure import saved_for_backward
from bench.train.memory import measure_memory
from bench.train.steps import SHAPES, Spec, build, copy_lora_A, make_batch, save_random_opt
from data.cache import write_json_atomic

CPU = torch.device("cpu")

# Measured on CPU (Xeon, AMX) at the tiny shape, fp32: the initial loss of either side is 3.1e-8 (relative) from the
# float64 loss of transformers' base model (B = 0: every contender computes the base); ours and PEFT agree exactly
# for two AdamW steps and by 4.8e-7 after them, while those steps move the loss by 3.8e-4. Bounds ~3-4x the error.
INITIAL_RTOL = 1e-7
STEP_ATOL = 2e-6


def base_loss_by_hand(folder: str, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
    """The mean next-token loss of the saved OPT on the batch, by transformers in float64."""
    hf = transformers.OPTForCausalLM.from_pretrained(folder).double().eval()
    x, y = batch
    with torch.no_grad():
        return F.cross_entropy(hf(input_ids=x).logits.flatten(0, 1), y.flatten()).item()


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
    base = base_loss_by_hand(str(tmp_path), batch)
    assert l0_ours == pytest.approx(base, rel=INITIAL_RTOL) and l0_peer == pytest.approx(base, rel=INITIAL_RTOL)
    for _ in range(2):
        a, b = ours.step().item(), peer.step().item()
        assert abs(a - b) <= STEP_ATOL
    with torch.no_grad():  # after two AdamW steps B != 0: the adapters moved, identically on both sides
        l2_ours, l2_peer = ours.loss_fn().item(), peer.loss_fn().item()
    assert l0_ours - l2_ours > 50 * STEP_ATOL and abs(l2_ours - l2_peer) <= STEP_ATOL
    saved = saved_for_backward(ours.loss_fn, ours.model)
    assert saved["activations"] > 0


def test_run_writes_the_expected_json(tmp_path):
    payload = run("main", ["tiny"], CPU, "fp32", Budget(steps=2, rounds=1, warmup=0, memory=0))
    write_json_atomic(tmp_path / "train_cpu.json", payload)
    data = json.loads((tmp_path / "train_cpu.json").read_text())
    for key in ("date", "device", "versions", "threads", "precision", "shapes", "timing", "matmul_peak", "results"):
        assert key in data, key
    assert set(data["versions"]) >= {"torch", "transformers", "peft"} and data["precision"] == "fp32"
    assert data["shapes"]["tiny"]["d_model"] == SHAPES["tiny"].d_model
    (result,) = data["results"]
    labels = [row["label"] for row in result["rows"]]
    assert labels == ["ours lora qv", "peft lora qv", "ours lora all6", "peft lora all6", "ours full", "hf full"]
    # Every contender starts from the same random OPT (seed 0) on the same batch, with B = 0: the base's loss.
    shape = SHAPES["tiny"]
    save_random_opt(shape, str(tmp_path / "opt"))
    base = base_loss_by_hand(str(tmp_path / "opt"), make_batch(shape, CPU))
    d, f, layers = shape.d_model, shape.d_ff, shape.n_layer
    in_plus_out = {"lora qv": 2 * (d + d), "lora all6": 4 * (d + d) + 2 * (d + f)}  # of one layer's adapted Linears
    for row in result["rows"]:
        assert row["loss_initial"] == pytest.approx(base, rel=INITIAL_RTOL), row["label"]
        kind = row["label"].split(" ", 1)[1]  # trainable: rank x (in + out) per adapted Linear, or every parameter
        want = layers * row["spec"]["rank"] * in_plus_out[kind] if kind in in_plus_out else row["total"]
        assert row["trainable"] == want, row["label"]
        t = row["timing"]
        assert t["steps"] == 2 and row["tokens_per_s"] == pytest.approx(shape.tokens / t["median_s"], rel=1e-12)
        assert row["memory"] is None
        cpu_peak = data["matmul_peak"]["cpu_time_flops_per_s"]  # on CPU in CPU time: this process's share
        assert row["mfu"] == pytest.approx(row["flops_per_step"] / t["cpu_median_s"] / cpu_peak, rel=1e-12)
    assert [r["peer"] for r in result["ratios"]] == ["peft lora qv", "peft lora all6", "hf full"]
    tps = {row["label"]: row["tokens_per_s"] for row in result["rows"]}
    for r in result["ratios"]:
        assert r["speedup"] == pytest.approx(tps[r["ours"]] / tps[r["peer"]], rel=1e-12)


def test_bf16_compare_checks_in_fp32_then_runs_both_sides_under_autocast(monkeypatch):
    """The GPU's precision on CPU: the strict same-function check builds the pair in fp32 first, then both sides run
    with a bf16 base and fp32 adapters under autocast (the peak is given: CPU bf16 GEMMs take seconds here)."""
    built = []

    def spy(spec, *args):
        built.append((spec.label, args[3], real_build(spec, *args)))
        return built[-1][2]

    real_build = bench.train.compare.build
    monkeypatch.setattr(bench.train.compare, "build", spy)
    ours = Spec(rank=4, alpha=8.0)
    result = compare(SHAPES["tiny"], [(ours, ours.peer())], CPU, "bf16", Budget(1, 1, 0, 0), {"flops_per_s": 1e12})
    labels = [ours.label, ours.peer().label]
    assert [(label, p) for label, p, _ in built] == [(x, p) for p in ("fp32", "bf16") for x in labels]
    for _, precision, c in built:
        layer = c.model.get_submodule(c.wrapped[0])  # a wrapped q_proj: PEFT's keeps its Linear as base_layer
        base = layer.base_layer.weight if c.spec.side == "peer" else layer.weight
        lora_a = [p for n, p in c.model.named_parameters() if "lora_A" in n][0]
        assert base.dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
        assert lora_a.dtype == torch.float32
    a, b = result["rows"]
    assert abs(a["loss_initial"] - b["loss_initial"]) <= 5e-2 and a["trainable"] == b["trainable"]
    assert a["mfu"] == pytest.approx(a["flops_per_step"] / a["timing"]["median_s"] / 1e12)
    assert result["ratios"][0]["speedup"] > 0


TINY_CLI = ["--device", "cpu", "--shape", "tiny", "--steps", "1", "--rounds", "1", "--warmup", "0", "--no-memory"]


def test_ablations_switch_one_optimisation_at_a_time(tmp_path, monkeypatch):
    """Every switch runs against PEFT and against our default. torch.compile is made the identity here (compiling
    takes minutes on this CPU; test_model_core compiles blocks for real): this tests the orchestration."""
    monkeypatch.setattr(torch, "compile", lambda fn=None, **kwargs: fn)
    data = main([*TINY_CLI, "--ablations", "--out", str(tmp_path / "abl.json")])
    assert json.loads((tmp_path / "abl.json").read_text())["mode"] == "ablations"
    (result,) = data["results"]
    ours = [row["label"] for row in result["rows"] if row["spec"]["side"] == "ours"]
    switches = ["plain-lora", "full-logits", "fused-adamw", "compiled-loss", "compiled-blocks", "ckpt"]
    assert ours == ["ours lora qv"] + [f"ours lora qv {s}" for s in switches]
    assert list(result["vs_ours_default"]) == ours and result["vs_ours_default"]["ours lora qv"] == 1.0
    assert [(r["ours"], r["peer"].split()[0]) for r in result["ratios"]] == [(label, "peft") for label in ours]
    losses = {round(row["loss_initial"], 4) for row in result["rows"]}
    assert len(losses) == 1  # every variant computes the same function


def test_sweep_holds_tokens_per_step_over_context_then_varies_rank(tmp_path, monkeypatch):
    axes = sweep_shapes(SHAPES["cpu"])
    assert [(a, s.seq, s.tokens, r) for a, s, r in axes[:4]] == [("seq", t, 2048, 16) for t in (256, 512, 1024, 2048)]
    assert [(a, s, r) for a, s, r in axes[4:]] == [("rank", SHAPES["cpu"], r) for r in (4, 8, 16, 32, 64)]
    # the run itself over the longest context and the largest rank only (each point is ~2 s here)
    monkeypatch.setattr(bench.train.cli, "sweep_shapes", lambda base: [sweep_shapes(base)[3], sweep_shapes(base)[-1]])
    data = main([*TINY_CLI, "--sweep", "--out", str(tmp_path / "sweep.json")])
    got = [(r["axis"], r["shape"]["seq"], r["rank"]) for r in data["results"]]
    assert got == [("seq", 2048, 16), ("rank", SHAPES["tiny"].seq, 64)]
    for result in data["results"]:
        assert [row["spec"]["rank"] for row in result["rows"]] == [result["rank"]] * 2
        assert result["ratios"][0]["speedup"] > 0


def test_memory_is_measured_in_a_fresh_process(tmp_path):
    shape = SHAPES["tiny"]
    save_random_opt(shape, str(tmp_path))
    mem = measure_memory(Spec(rank=4, alpha=8.0), shape, str(tmp_path), CPU, "fp32", steps=2)
    assert "error" not in mem, mem
    assert mem["rss_after_build"] > 0 and mem["rss_peak"] >= mem["rss_after_build"]
    assert mem["rss_step_delta"] == mem["rss_peak"] - mem["rss_after_build"]
    # what autograd saves is a property of the function, not of the process: the same bytes counted here
    here = build(Spec(rank=4, alpha=8.0), shape, str(tmp_path), CPU, "fp32", make_batch(shape, CPU))
    assert mem["saved"]["activations"] == saved_for_backward(here.loss_fn, here.model)["activations"] > 0


def test_gpu_timing_path_times_blocks_in_rotated_order_without_cpu_time(monkeypatch):
    """run_rounds on CUDA: a block of `steps` per contender between two syncs, the order rotated each round, and no
    CPU time (time_steps stands in for the CUDA events here)."""
    order = []

    def cuda_like_time_steps(step, n, device):
        for _ in range(n):
            step()
        return [0.01] * n, None

    monkeypatch.setattr(bench.train.compare, "time_steps", cuda_like_time_steps)
    contenders = [SimpleNamespace(spec=SimpleNamespace(label=x), step=lambda x=x: order.append(x)) for x in "ab"]
    out = run_rounds(contenders, torch.device("cuda"), Budget(steps=4, rounds=2, warmup=1, memory=0))
    assert "".join(order) == "ab" + "aaaabbbb" + "ab" + "bbbbaaaa"  # warm-up, then blocks; round 2 starts with b
    assert out["a"] == {"median_s": 0.01, "steps": 8, "rounds": 2, "round_medians_s": [0.01, 0.01]}
