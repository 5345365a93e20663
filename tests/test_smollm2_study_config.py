"""The SmolLM2 study's one-command reproduction (`--base_model smollm2-135m --settings
experiments/configs/smollm2_study.yaml`) runs end to end: here as a --quick run on a tiny random Llama GGUF built in the
test (the real file is optional in CI). Every value of the three ablations ends ok, forgetting is measured on the
built-in base's held-out stdlib text, and the report names the base."""

from __future__ import annotations

from pathlib import Path

from gguf_helpers import hf_model, run_lab, stdlib_sample, tiny_bpe, write_gguf

from experiments.run import CONFIG_DIR, build_parser, resolve_runs

REPO = Path(__file__).resolve().parent.parent
STUDY = CONFIG_DIR / "smollm2_study.yaml"


def test_study_settings_set_budgets_and_keep_every_value(tmp_path):
    gguf = write_gguf(tmp_path / "t.gguf", hf_model("llama", tiny_bpe(300).get_vocab_size()), tiny_bpe(300), "Q8_0")
    argv = ["--base_model", str(gguf), "--settings", str(STUDY), "--seeds", "3"]
    specs = resolve_runs(build_parser().parse_args(argv))
    assert len(specs) == 78  # (5 + 4 + 4) values x 2 learning rates x 3 seeds
    assert {(s.cfg.train.tokens, s.cfg.train.batch_tokens, s.cfg.eval.source_data) for s in specs} == {
        (32768, 4096, "builtin")
    }
    assert {s.cfg.train.lr for s in specs} == {0.003, 0.01} and {s.cfg.data.tune_fraction for s in specs} == {0.1}
    # --quick still makes a smoke run of the study: its budgets win over the settings file's
    quick = resolve_runs(build_parser().parse_args([*argv, "--quick"]))
    assert {s.cfg.train.tokens for s in quick} == {2048} and len(quick) == 78


def test_quick_run_of_the_study_on_a_tiny_llama(tmp_path):
    tok = tiny_bpe(400)
    model = hf_model("llama", tok.get_vocab_size(), max_position_embeddings=2048)  # the study's longest context
    gguf = write_gguf(tmp_path / "tiny.gguf", model, tok, "Q8_0")
    data = stdlib_sample(tmp_path / "finetune", 12, 10_000, 30_000)
    out = tmp_path / "out"
    args = ["--quick", "--base_model", str(gguf), "--settings", str(STUDY), "--data", str(data)]
    args += ["--set", "data.val_fraction=0.34"]  # a few documents: both splits must hold a 2048-token window
    rows = run_lab(args, out, timeout=900, SLM_LORA_CACHE=str(tmp_path / "cache"))
    assert len(rows) == 26 and {r["status"] for r in rows} == {"ok"}  # 13 values at each lr of the grid
    assert {r["ablation"] for r in rows} == {"lora_rank", "target_modules", "context_length"}
    assert {r["base_model"] for r in rows} == {str(gguf)}
    assert {r["lr"] for r in rows} == {0.003, 0.01} and all(r["tune_loss"] is not None for r in rows)
    assert all(r["source_val_ppl"] is not None and r["base_source_val_ppl"] is not None for r in rows)
    every = {r["adapted_modules"] for r in rows if r["value"] == "q_proj,k_proj,v_proj,out_proj,fc1,fc2"}
    attention = [f"layers.*.self_attn.{n}_proj" for n in "qkvo"]
    seven = attention + [f"layers.*.mlp.{n}_proj" for n in ("gate", "up", "down")]
    assert len(every) == 1 and set(every.pop().split(", ")) == set(seven)  # the seed's "all six": all seven
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "- base model: `tiny.gguf`, a GGUF file dequantized" in report
