"""The bf16 benchmarks: bench.train.bf16_step builds each precision variant as the lab runs it, and
bench.train.precision_study pairs its variants' runs by (value, seed) through the report's own paired test."""

import json
import math

import pytest
import torch

from bench.train import bf16_step, precision_study
from experiments.finetune.row import RESULT_KEYS
from experiments.report.markdown import main as report_main
from experiments.report.stats import paired
from experiments.sweep.results import read_rows
from lora import LoRALinear
from model import GPTConfig

TINY = GPTConfig(vocab_size=97, n_layer=2, n_head=4, d_model=32, d_ff=64, max_position_embeddings=16)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tok = torch.randint(0, 97, (2, 17), generator=g)
    return tok[:, :-1].contiguous(), tok[:, 1:].contiguous()


@pytest.mark.parametrize("variant", bf16_step.VARIANTS)
def test_each_variant_is_the_lab_step_it_names(variant):
    model, step = bf16_step.build(variant, TINY, ["q_proj", "v_proj"], _batch())
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad and p.dim() == 2}
    lora = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert lora and all(m.fused == (variant != "bf16-two-matmul") for m in lora)
    # float32 frozen weights except where keep_frozen_in ran (the tied embedding/head stays float32 always)
    kept = variant in ("bf16", "bf16-two-matmul", "bf16-compiled")
    assert frozen == ({torch.float32, torch.bfloat16} if kept else {torch.float32})
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    loss = step()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    after = [p for p in model.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(after, before))  # AdamW moved the adapters
    assert all(p.grad is None for p in after)  # zero_grad(set_to_none) as the loop does


def test_counted_flops_see_the_step_s_gemms():
    """FlopCounterMode counts at least the 2x-forward GEMMs of the frozen linears and the head."""
    _, step = bf16_step.build("bf16", TINY, ["q_proj", "v_proj"], _batch())
    tokens, d, f, v = 2 * 16, 32, 64, 97
    linear_fwd = 2 * tokens * (TINY.n_layer * (4 * d * d + 2 * d * f) + v * d)
    assert bf16_step.counted_flops(step) >= 2 * linear_fwd


def _row(variant: str, value: int, seed: int, ppl: float, t: float) -> dict:
    return {"variant": variant, "value": value, "seed": seed, "status": "ok", "val_ppl": ppl, "train_time_s": t}


def test_the_pooled_difference_counts_a_shared_baseline_once():
    """The default study's baseline (rank 16 = q,v = context 512) is one run listed under three values."""
    rows = []
    for seed, (fp32, bf16) in enumerate([(10.0, 9.0), (11.0, 10.5), (12.0, 12.2)]):
        for value in ("lora_rank=16", "target_modules=q,v"):  # the same run twice
            rows.append(_row("float32", value, seed, fp32, 2.0) | {"config_hash": f"base{seed}"})
            rows.append(_row("bf16-fused", value, seed, bf16, 1.0) | {"config_hash": f"base{seed}"})
        rows.append(_row("float32", "lora_rank=4", seed, fp32 + 1, 2.0) | {"config_hash": f"r4-{seed}"})
        rows.append(_row("bf16-fused", "lora_rank=4", seed, fp32 + 0.5, 1.0) | {"config_hash": f"r4-{seed}"})
    pooled = precision_study.summarize(rows, ["float32", "bf16-fused"])["bf16-fused - float32"]["val_ppl_pooled"]
    want = paired([9.0, 10.5, 12.2, 10.5, 11.5, 12.5], [10.0, 11.0, 12.0, 11.0, 12.0, 13.0])
    assert (
        pooled["n"] == 6 and pooled["diff"] == pytest.approx(want.diff) and pooled["half"] == pytest.approx(want.half)
    )


def test_study_summary_pairs_by_value_and_seed():
    a = {(4, 0): 10.0, (4, 1): 11.0, (4, 2): 10.5, (8, 0): 9.0, (8, 1): 9.4, (8, 2): 9.1}
    b = {(4, 0): 10.3, (4, 1): 11.1, (4, 2): 10.4, (8, 0): 9.5, (8, 1): 9.6, (8, 2): 9.2}
    rows = [_row("float32", v, s, ppl, 2.0) for (v, s), ppl in a.items()]
    rows += [_row("bf16-fused", v, s, ppl, 1.0) for (v, s), ppl in b.items()]
    rows.append({**_row("bf16-fused", 16, 0, 1.0, 1.0), "status": "failed"})  # no pair: left out
    out = precision_study.summarize(rows, ["float32", "bf16-fused"])
    s = out["bf16-fused - float32"]
    keys = sorted(a)
    want = paired([b[k] for k in keys], [a[k] for k in keys])
    assert s["val_ppl_pooled"]["diff"] == pytest.approx(want.diff) and s["val_ppl_pooled"]["half"] == pytest.approx(
        want.half
    )
    want4 = paired([b[4, s] for s in range(3)], [a[4, s] for s in range(3)])
    assert s["val_ppl_per_value"]["4"]["diff"] == pytest.approx(want4.diff)
    assert s["train_time_ratio_median"] == 0.5


def test_the_study_restores_the_fused_switch(monkeypatch, tiny_config, tmp_path):
    seen = []

    def fail(cfg, run_dir, progress):
        seen.append((cfg.train.dtype, LoRALinear.fused))
        raise RuntimeError("boom")

    monkeypatch.setattr(precision_study, "train_run", fail)
    for variant in ("bf16-two-matmul", "float32"):
        with pytest.raises(RuntimeError):
            precision_study.run_variant(tiny_config(tmp_path), variant, tmp_path / variant)
        assert LoRALinear.fused is True
    assert seen == [("bfloat16", False), ("float32", True)]


def test_a_finished_run_is_read_back_and_a_failed_one_trained_again(monkeypatch, tiny_config, tmp_path):
    trained = []

    def train(cfg, run_dir, progress):
        trained.append(run_dir.name)
        return {"status": "ok", "val_ppl": 7.5}

    monkeypatch.setattr(precision_study, "train_run", train)
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "result.json").write_text(json.dumps({"status": "ok", "val_ppl": 3.25}))
    (tmp_path / "failed").mkdir()
    (tmp_path / "failed" / "result.json").write_text(json.dumps({"status": "failed", "val_ppl": None}))
    assert precision_study.run_variant(tiny_config(tmp_path), "float32", tmp_path / "done")["val_ppl"] == 3.25
    assert precision_study.run_variant(tiny_config(tmp_path), "float32", tmp_path / "failed")["val_ppl"] == 7.5
    assert trained == ["failed"]


def test_each_variant_becomes_a_lab_results_folder_that_the_report_reads(monkeypatch, tmp_path):
    """Every (value, seed) row of each variant lands in WORK/<variant>/results.jsonl with the lab's identity, and the
    report compares the two folders; a second invocation reads the runs back instead of training them."""
    trained = []

    def train(cfg, run_dir, progress):
        trained.append(run_dir)
        shift = 0.5 if cfg.train.dtype == "bfloat16" else 0.0
        ppl = 100.0 - cfg.lora.rank / 8 + cfg.train.seed / 10 + shift
        result = dict.fromkeys(RESULT_KEYS) | {"status": "ok", "val_ppl": ppl, "val_loss": math.log(ppl)}
        result |= {"train_time_s": 10.0, "dtype": cfg.train.dtype}
        (run_dir / "result.json").parent.mkdir(parents=True, exist_ok=True)
        (run_dir / "result.json").write_text(json.dumps(result))
        return result

    monkeypatch.setattr(precision_study, "train_run", train)
    argv = ["--config", "experiments/configs/abl_lora_rank.yaml", "--quick", "--seeds", "2", "--work", str(tmp_path)]
    argv += ["--variants", "float32", "bf16-fused", "--out", str(tmp_path / "out.json")]
    out = precision_study.main(argv)
    n_runs = len(trained)
    assert n_runs == len(out["rows"]) > 0  # one run per (value, seed, variant): the rank study shares no baseline
    for variant, shift in (("float32", 0.0), ("bf16-fused", 0.5)):
        rows = read_rows(tmp_path / variant)
        assert len(rows) == len(out["rows"]) // 2
        assert all(r["val_ppl"] == 100.0 - r["lora_rank"] / 8 + r["seed"] / 10 + shift for r in rows)
        assert {r["ablation"] for r in rows} == {"lora_rank"}
    assert out["summary"]["bf16-fused - float32"]["val_ppl_pooled"]["diff"] == pytest.approx(0.5)
    precision_study.main(argv)  # started again: every run read back, the folders rebuilt the same
    assert len(trained) == n_runs and len(read_rows(tmp_path / "float32")) == len(out["rows"]) // 2
    args = [str(tmp_path / "bf16-fused"), "--compare", str(tmp_path / "float32"), "--no-plots"]
    assert report_main([*args, "--label", "bf16", "--compare-label", "fp32"]) == 0
    assert "## bf16 vs fp32" in (tmp_path / "bf16-fused" / "report.md").read_text()
