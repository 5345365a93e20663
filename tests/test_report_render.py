"""report.md and the plots from a results file with known numbers: tables, CIs, significance, and the
"expected vs observed" verdicts computed from the data (both directions: held and did not hold)."""

from __future__ import annotations

import random
import re
import struct

from experiments.config.config import load_config, with_values
from experiments.report.markdown import main as report_main
from experiments.report.markdown import write_report
from experiments.report.studies import load_studies
from experiments.run import DEFAULT_STUDY
from experiments.sweep.plan import plan_runs
from experiments.sweep.sweep import run_sweep


def make_runner(ppl_of, time_of=lambda cfg: 1.0, mem_of=lambda cfg: 2**28, noise=0.02, fail=()):
    rng = random.Random(0)

    def run(spec, run_dir, resume):
        cfg = spec.cfg
        if spec.value in fail:
            return {"status": "failed", "error": "ValueError: boom\nlast line of the error"}
        return {
            "status": "ok",
            "val_ppl": ppl_of(cfg) + rng.gauss(0, noise),
            "base_val_ppl": 20.0,
            "train_tokens": 4096,
            "train_time_s": time_of(cfg) * (1 + rng.gauss(0, 0.01)),
            "tokens_per_s": 99.0,
            "trainable_params": 64
            * cfg.lora.rank
            * len(cfg.lora.target_modules)
            * (4 if "fc1" in cfg.lora.target_modules else 1),
            "total_params": 10**6,
            "peak_rss_bytes": mem_of(cfg),
            "saved_for_backward_bytes": mem_of(cfg) // 8,
            "device": "cpu (test)",
            "dtype": "float32",
            "torch_version": "t",
            "world_size": 1,
        }

    return run


def sweep(out, path, runner, seeds=3):
    run_sweep(plan_runs(load_config(path), name=path.stem, seeds=seeds), out, runner, say=lambda s: None)


def test_rank_report_held(tmp_path):
    # ppl falls until rank 16 then flattens; time and memory grow with rank.
    ppl = {4: 12.0, 8: 11.0, 16: 10.0, 32: 10.0, 64: 10.01}
    sweep(
        tmp_path,
        DEFAULT_STUDY[0],
        make_runner(lambda c: ppl[c.lora.rank], lambda c: 1 + c.lora.rank / 16, lambda c: 2**28 + c.lora.rank * 2**22),
    )
    text = (write_report(tmp_path), (tmp_path / "report.md").read_text())[1]
    assert "## lora_rank" in text and "alpha policy: fixed, alpha = 32.0" in text
    assert "4,096 training tokens per run, the same for every value" in text
    row4 = next(line for line in text.splitlines() if line.startswith("| 4 |"))
    assert re.search(r"\| 1[12]\.\d{3} ± 0\.\d{3} \|", row4)  # mean ± CI over 3 seeds
    assert "significant" in row4 and "within noise" not in row4  # 12 vs 10 with sd 0.02
    row32 = next(line for line in text.splitlines() if line.startswith("| 32 |"))
    assert "within noise" in row32  # 10.00 vs 10.00
    checks = re.findall(r"^\| (Higher rank[^|]*) \| (.*) \| \*\*(.*)\*\* \|$", text, re.M)
    verdicts = {c[0]: c[2] for c in checks}
    assert verdicts["Higher rank improves validation perplexity, up to a point"] == "held"
    assert verdicts["Higher rank costs more training time"] == "held"
    assert verdicts["Higher rank costs more memory (peak)"] == "held"
    assert "no gain beyond rank 16" in text
    assert "## Answers" in text and "- **lora_rank** (`lora.rank`): rank 16: the best perplexity" in text
    for name in ("lora_rank.png", "lora_rank_tradeoff.png", "ppl_vs_params.png"):
        png = (tmp_path / "plots" / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24])[0] > 500
    assert "![lora_rank, alpha policy fixed](plots/lora_rank.png)" in text


def test_opposite_direction_within_noise_is_said_so(tmp_path):
    # Peak memory drifts down with rank by far less than its run-to-run spread: not "held", and not a finding
    # either; time drops clearly: "did not hold" without qualification.
    rng = random.Random(1)
    sweep(
        tmp_path,
        DEFAULT_STUDY[0],
        make_runner(
            lambda c: 10.0,
            lambda c: 2.0 - c.lora.rank / 64,
            lambda c: 2**28 - c.lora.rank * 1000 + rng.randint(-(2**20), 2**20),
        ),
    )
    write_report(tmp_path)
    verdicts = dict(
        re.findall(
            r"^\| (Higher rank costs[^|]*) \| .* \| \*\*(.*)\*\* \|$", (tmp_path / "report.md").read_text(), re.M
        )
    )
    assert verdicts["Higher rank costs more memory (peak)"] == "did not hold (within noise)"
    assert verdicts["Higher rank costs more training time"] == "did not hold"


def test_target_report_did_not_hold_and_failures_listed(tmp_path):
    # More modules make ppl *worse* here, and the MLP-only addition fails: the report must say so.
    ppl = {2: 10.0, 4: 10.5, 6: 11.0}
    sweep(
        tmp_path,
        DEFAULT_STUDY[1],
        make_runner(lambda c: ppl[len(c.lora.target_modules)], fail=(["q_proj", "v_proj", "fc1", "fc2"],)),
        seeds=2,
    )
    write_report(tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert re.search(r"More target modules improve validation perplexity \|.*\| \*\*did not hold\*\*", text)
    assert re.search(r"more trainable parameters \|.*\| \*\*held\*\*", text)
    assert re.search(r"q_proj and v_proj matter most.*100% of that gain.*\*\*held\*\*", text)
    assert "failed 2/2" in text and "last line of the error" in text
    assert "no finished run" not in text  # that note lives in the plot title
    assert (tmp_path / "plots" / "target_modules.png").exists()


def test_single_seed_and_two_studies_of_one_ablation(tmp_path, capsys):
    cfg = load_config(DEFAULT_STUDY[2])
    runner = make_runner(
        lambda c: 10.0 - c.model.max_position_embeddings / 1024,
        lambda c: c.model.max_position_embeddings / 256,
        lambda c: c.model.max_position_embeddings * 2**18,
    )
    run_sweep(plan_runs(cfg, name="ctx", seeds=1), tmp_path, runner, say=lambda s: None)
    from experiments.config.config import with_value

    run_sweep(
        plan_runs(with_value(cfg, "train.lr", 1e-4), name="ctx", values=[256, 512]),
        tmp_path,
        runner,
        say=lambda s: None,
    )
    studies = load_studies(tmp_path)
    assert len(studies) == 2 and all("train.lr=" in s.differs for s in studies)
    assert report_main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "[held (1 seed)] Longer context is slower" in out
    assert "[held (1 seed)] Longer context uses more memory (peak)" in out
    assert "recommended: context 2048: the best perplexity (8.0" in out and "provisional: one seed per value" in out
    text = (tmp_path / "report.md").read_text()
    assert "1 seed" in text and "± " not in text.split("## context_length")[1].split("###")[0].split("|---|")[1]
    assert text.count("## context_length (study ") == 2
    assert report_main([str(tmp_path / "nowhere")]) == 2


def test_each_alpha_policy_is_a_table_of_its_own_with_its_scaling(tmp_path):
    """The three policies through config, sweep and report: rows keep their resolved alpha, tables stay apart."""
    for policy in ("fixed", "double_rank", "rslora"):
        cfg = with_values(load_config(DEFAULT_STUDY[0]), [("lora.alpha_policy", policy, "--set")])
        run_sweep(plan_runs(cfg, name="lora_rank", seeds=2), tmp_path, make_runner(lambda c: 10.0), say=lambda s: None)
    alphas = {(r["alpha_policy"], r["lora_rank"]): r["lora_alpha"] for st in load_studies(tmp_path) for r in st.rows}
    assert alphas[("double_rank", 4)] == 8.0 and alphas[("double_rank", 64)] == 128.0
    assert alphas[("fixed", 64)] == alphas[("rslora", 64)] == 32.0  # rslora keeps alpha, divides by √r
    text = (write_report(tmp_path), (tmp_path / "report.md").read_text())[1]
    for title, scaling in (
        ("lora_rank, alpha policy fixed", "fixed, alpha = 32.0 (scaling alpha/rank shrinks as rank grows)"),
        ("lora_rank, alpha policy double_rank", "double_rank, alpha = 2·rank (scaling 2 at every rank)"),
        ("lora_rank, alpha policy rslora", "rslora, alpha = 32.0 (scaling alpha/√rank)"),
    ):
        section = text.split(f"## {title} (study ")[1].split("\n### ")[0]  # up to its expected-vs-observed
        assert f"- alpha policy: {scaling}" in section and section.count("\n| ") == 6  # header + 5 ranks
