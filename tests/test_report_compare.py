"""Two results folders, the same ablations on two bases whose perplexities differ in scale (~225 and ~11): the
comparison section's relative Δs, agreement words, recommendations, verdicts and the base model's ppl against
context, checked against numbers computed here from the planted per-seed differences (scipy's paired t-test)."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

from row_helpers import a_row
from scipy import stats

from experiments.config.config import load_config
from experiments.report.compare import agreement, compare_section
from experiments.report.markdown import main as report_main
from experiments.report.recommend import recommend
from experiments.report.stats import compare
from experiments.report.studies import load_studies
from experiments.run import DEFAULT_STUDY
from experiments.sweep.plan import plan_runs
from experiments.sweep.results import value_label

RANK, TARGETS, CONTEXT = DEFAULT_STUDY
SHIFT = (-4.0, 1.5, 4.0)  # what each seed does to every value alike (one data order, one init): pairing removes it
TOY, SMOL = 225.0, 11.0  # each side's baseline val ppl
# value -> the planted per-seed difference from the baseline (rank 16); the comments say what the paired test finds.
TOY_RANK = {
    4: (9.0, 10.0, 11.0),  # significantly worse
    8: (1.0, -2.0, 2.5),  # within noise
    16: None,  # the baseline
    32: (-3.0, -4.0, -3.5),  # significantly better
    64: (2.0, 2.2, 2.4),  # significantly worse
}
SMOL_RANK = {
    4: (0.5, 0.6, 0.55),  # significantly worse: agree
    8: (0.3, 0.31, 0.29),  # significantly worse: smol only
    16: None,
    32: (0.1, -0.2, 0.15),  # within noise: toy only
    64: (-0.2, -0.25, -0.3),  # significantly better: disagree
    128: (1.0, 1.1, 1.2),  # only on this side
}


def rows(path: Path, planted: dict, base: float, *, seeds=3, time=lambda v: 1.5, base_ppl=lambda v: 3 * TOY, **over):
    """A finished row per value and seed: val ppl = base + the seed's shift (scaled to the base) + the planted
    difference; train time and the base model's ppl as functions of the value."""
    values = [v.split(",") if isinstance(v, str) else v for v in planted]
    specs = plan_runs(load_config(path), name=path.stem, values=values, seeds=seeds)
    first = min(s.seed for s in specs)
    out = []
    for spec in specs:
        seed, value = spec.seed - first, value_label(spec.value)
        d = planted[value] or (0.0, 0.0, 0.0)
        out.append(
            a_row(
                spec,
                val_ppl=baseline_runs(base)[seed] + d[seed],
                base_val_ppl=base_ppl(value),
                train_time_s=time(value) + 0.01 * seed,
                trainable_params=2048 * spec.cfg.lora.rank * len(spec.cfg.lora.target_modules),
                **over,
            )
        )
    return out


def folder(tmp: Path, name: str, rows_: list, base: str | None = None, in_rows: bool = False) -> Path:
    """A results folder holding `rows_`; with `base`, the rows' base_model (`in_rows`), or, as rows older than that
    column have it, one run folder whose config.json names model.base."""
    out = tmp / name
    out.mkdir()
    rows_ = [{**r, "base_model": base} if in_rows else {k: v for k, v in r.items() if k != "base_model"} for r in rows_]
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows_), encoding="utf-8")
    if base is not None and not in_rows:
        (out / "runs" / "x").mkdir(parents=True)
        (out / "runs" / "x" / "config.json").write_text(json.dumps({"model": {"base": base}}), encoding="utf-8")
    return out


def baseline_runs(base: float) -> list[float]:
    return [base + s * base / TOY for s in SHIFT]


def mean(base: float) -> float:
    return statistics.fmean(baseline_runs(base))


def expected_cell(planted: tuple[float, ...], base: float) -> str:
    """The Δ cell computed here: scipy's paired t-test on the planted runs, the difference and its CI in % of the
    baseline's mean, "significant" when p < 0.05."""
    ref = baseline_runs(base)
    res = stats.ttest_rel([r + d for r, d in zip(ref, planted)], ref)
    ci = res.confidence_interval(0.95)
    scale = 100.0 / mean(base)
    word = "significant" if res.pvalue < 0.05 else "within noise"
    return f"{statistics.fmean(planted) * scale:+.2f} ± {(ci.high - ci.low) / 2 * scale:.2f}%, {word}, paired"


def table_rows(text: str) -> dict[str, list[str]]:
    return {cells[0]: cells[1:] for line in text.splitlines() if (cells := line.strip("| ").split(" | "))[0]}


def section(tmp_path, this_rows, other_rows, labels=("smol", "toy")) -> str:
    this = load_studies(folder(tmp_path, "this", this_rows))
    other = load_studies(folder(tmp_path, "other", other_rows))
    return compare_section(this, other, labels)


def rank_section(tmp_path) -> str:
    smol = rows(RANK, SMOL_RANK, SMOL, time=lambda r: 10.0 - r / 16)  # time falls with rank on this side only
    toy = rows(RANK, TOY_RANK, TOY, time=lambda r: 1.0 + r / 16) + rows(
        TARGETS, {"q_proj,v_proj": None, "q_proj,v_proj,fc1,fc2": (-5.0, -6.0, -5.5)}, TOY
    )
    return section(tmp_path, smol, toy)


def test_relative_deltas_and_agreement_words(tmp_path):
    text = rank_section(tmp_path)
    assert text.startswith("## smol vs toy\n")
    table = table_rows(text.split("### lora_rank")[1].split("| expected |")[0])
    assert table["value"] == ["Δ val ppl vs baseline on smol", "Δ val ppl vs baseline on toy", "agreement"]
    assert table["16"] == ["baseline", "baseline", "—"]
    words = {4: "agree", 8: "smol only", 32: "toy only", 64: "disagree"}
    for rank, word in words.items():
        assert table[str(rank)] == [expected_cell(SMOL_RANK[rank], SMOL), expected_cell(TOY_RANK[rank], TOY), word]
    assert table["128 (only on smol)"] == [expected_cell(SMOL_RANK[128], SMOL), "—", "not comparable"]
    assert "Not compared: target_modules (only on toy)." in text


def test_recommendations_verdicts_and_the_closing_sentence(tmp_path):
    text = rank_section(tmp_path)
    smol_st = load_studies(tmp_path / "this")[0]
    toy_st = next(s for s in load_studies(tmp_path / "other") if s.ablation == "lora_rank")
    # smol: rank 64 is best; ranks 4, 8, 16 are significantly worse than it, rank 32 is not (p ≈ 0.15): the pick.
    # toy: rank 32 is best; rank 8 is not significantly worse than it (per-seed 4, 2, 6: p ≈ 0.07): the pick.
    assert stats.ttest_rel([0.3, 0.05, 0.45], [0.0, 0.0, 0.0]).pvalue > 0.05
    assert stats.ttest_rel([4.0, 2.0, 6.0], [0.0, 0.0, 0.0]).pvalue > 0.05
    assert recommend(smol_st).value.value == 32 and recommend(toy_st).value.value == 8
    assert f"- recommended on smol: {recommend(smol_st).evidence}\n" in text
    assert f"- recommended on toy: {recommend(toy_st).evidence}\n" in text
    assert "- **different values**: rank 32 on smol, rank 8 on toy" in text
    verdicts = table_rows(text.split("| expected |")[1].split("\n\n")[0])
    assert verdicts["Higher rank improves validation perplexity, up to a point"] == ["**held**", "**held**", "yes"]
    assert verdicts["Higher rank costs more training time"] == ["**did not hold**", "**held**", "**no**"]
    no_column = "Higher rank costs more memory (activations saved for backward)"  # the rows have no such column
    assert verdicts[no_column] == ["**not testable**"] * 2 + ["not comparable"]
    smol64, toy64 = (100 * statistics.fmean(d[64]) / mean(b) for d, b in ((SMOL_RANK, SMOL), (TOY_RANK, TOY)))
    assert text.rstrip().endswith(
        "Where smol and toy disagree: lora_rank: rank 64 significantly in opposite directions "
        f"({smol64:+.2f}% on smol, {toy64:+.2f}% on toy); lora_rank: "
        'recommended rank 32 on smol, rank 8 on toy; lora_rank: "Higher rank costs more training time" (did not hold '
        "vs held)."
    )


def test_the_same_effects_at_another_scale_agree_everywhere(tmp_path):
    toy = rows(RANK, TOY_RANK, TOY) + rows(CONTEXT, {256: (2.0, 3.0, 2.5), 512: None, 1024: (4.0, 5.0, 4.5)}, TOY)
    small = [{**r, "val_ppl": r["val_ppl"] / 20, "base_val_ppl": r["base_val_ppl"] / 20} for r in toy]
    text = section(tmp_path, small, toy, ("small", "toy"))
    table = table_rows(text.split("### lora_rank")[1].split("| expected |")[0])
    assert table["4"][0] == table["4"][1] == expected_cell(TOY_RANK[4], TOY)
    assert table["8"][2] == "neither significant" and table["64"][2] == "agree"
    assert "- the same value on both: rank 8" in text and "- the same value on both: context 512" in text
    assert "**no**" not in text and not re.search(r"\| disagree \|$", text, re.M)
    assert text.rstrip().endswith(
        "small and toy agree everywhere the data can tell: no effect significant in opposite directions, the same "
        "recommended values and the same verdicts (rows marked one-sided, 1 seed or not comparable cannot tell)."
    )


def test_base_model_ppl_against_context_on_each_side(tmp_path):
    planted = {256: (2.0, 3.0, 2.5), 512: None, 1024: (-1.0, 1.5, -0.2), 2048: (5.0, 6.0, 5.5)}
    toy_base = {256: 300.0, 512: 290.0, 1024: 285.0, 2048: 284.5}  # falls, then flat: never rises
    smol_base = {256: 11.3, 512: 10.8, 1024: 11.5, 2048: 14.0}  # rises past 512
    smol_planted = {k: d and tuple(x / 20 for x in d) for k, d in planted.items()}
    text = section(
        tmp_path,
        rows(CONTEXT, smol_planted, SMOL, base_ppl=smol_base.get),
        rows(CONTEXT, planted, TOY, base_ppl=toy_base.get),
    )
    part = text.split("The base model's own val ppl before fine-tuning")[1]
    table = table_rows(part.split("\n\n")[1])
    assert table["1024"] == ["11.500", "285.000"] and table["256"] == ["11.300", "300.000"]
    up = [(512, 1024), (1024, 2048)]
    where = ", ".join(f"{a} → {b} ({smol_base[b] / smol_base[a] - 1:+.1%})" for a, b in up)
    assert f"- on smol: **it rises**: {where}\n" in part  # 512 → 1024 (+6.5%), 1024 → 2048 (+21.7%)
    assert "- on toy: it does not rise (no step up by more than 0.5%)" in part
    verdicts = table_rows(text.split("| expected |")[1].split("\n\n")[0])
    assert verdicts[next(k for k in verdicts if k.startswith("The base model's own val ppl"))] == [
        "**did not hold**",
        "**held**",
        "**no**",
    ]


def test_one_seed_on_a_side_tells_direction_only(tmp_path):
    # toy: rank 4 vs 16 within noise (its verdict: within noise); smol, one seed: rank 16 better (held, 1 seed).
    smol = rows(RANK, {4: (0.5,), 16: None}, SMOL, seeds=1)
    text = section(tmp_path, smol, rows(RANK, {4: TOY_RANK[8], 16: None}, TOY))
    table = table_rows(text.split("### lora_rank")[1].split("| expected |")[0])
    one_seed = f"{100 * 0.5 / baseline_runs(SMOL)[0]:+.2f}%, 1 seed"
    assert table["4"] == [one_seed, expected_cell(TOY_RANK[8], TOY), "not comparable"]
    verdicts = table_rows(text.split("| expected |")[1].split("\n\n")[0])
    improves = "Higher rank improves validation perplexity, up to a point"
    assert verdicts[improves] == ["**held (1 seed)**", "**within noise**", "no (1 seed)"]
    assert "- **different values**: rank 16 on smol, rank 4 on toy (provisional: one seed)" in text
    closing = text.rstrip().rsplit("\n", 1)[1]
    assert closing.startswith("Where smol and toy disagree: ") and improves not in closing


def test_no_ablation_in_common(tmp_path):
    text = section(tmp_path, rows(RANK, {4: None}, SMOL), rows(CONTEXT, {512: None}, TOY))
    assert text.endswith(
        "Not compared: lora_rank (only on smol), context_length (only on toy).\n\n"
        "No ablation is in both folders: nothing to compare.\n"
    )


def test_agreement_of_single_seeds_and_missing_sides():
    sig_up, sig_down = (
        compare({0: 5.0, 1: 6.0, 2: 7.0}, {0: 1.0, 1: 2.0, 2: 3.1}),
        compare({0: 1.0, 1: 2.0, 2: 3.1}, {0: 5.0, 1: 6.0, 2: 7.0}),
    )
    noise = compare({0: 5.0, 1: 2.0, 2: 7.0}, {0: 4.0, 1: 4.0, 2: 4.5})
    one_seed = compare({0: 5.0}, {0: 1.0})
    labels = ("A", "B")
    assert sig_up.significant and sig_down.significant and noise.significant is False and one_seed.significant is None
    assert agreement(sig_up, sig_up, labels) == "agree" and agreement(sig_up, sig_down, labels) == "disagree"
    assert agreement(noise, sig_down, labels) == "B only" and agreement(sig_up, noise, labels) == "A only"
    assert agreement(noise, noise, labels) == "neither significant"
    assert agreement(one_seed, sig_up, labels) == agreement(sig_up, None, labels) == "not comparable"


def test_cli_appends_the_section_with_labels_from_the_bases(tmp_path, capsys):
    gguf = "/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    smol = folder(tmp_path, "smol", rows(RANK, SMOL_RANK, SMOL, run_dir="runs/x"), base=gguf)
    toy = folder(tmp_path, "toy", rows(RANK, TOY_RANK, TOY, run_dir="runs/x"), base="builtin")
    assert report_main([str(smol), "--compare", str(toy), "--no-plots"]) == 0
    report = (smol / "report.md").read_text(encoding="utf-8")
    assert report.startswith("# LoRA ablation report") and "\n## SmolLM2-135M-Instruct.Q4_1 vs toy base\n" in report
    assert "| 64 | " in report.split("## SmolLM2-135M-Instruct.Q4_1 vs toy base")[1]
    assert report_main([str(smol), "--compare", str(toy), "--no-plots", "--label", "S", "--compare-label", "T"]) == 0
    report = (smol / "report.md").read_text(encoding="utf-8")
    assert "\n## S vs T\n" in report and report.count("## S vs T") == 1 and "SmolLM2" not in report
    assert re.search(r"^\| 64 \| .* \| .* \| disagree \|$", report, re.M)
    twin = folder(tmp_path, "twin", rows(RANK, TOY_RANK, TOY), base="builtin", in_rows=True)  # the rows name it
    assert report_main([str(twin), "--compare", str(toy), "--no-plots"]) == 0
    assert "\n## toy base (twin) vs toy base (toy)\n" in (twin / "report.md").read_text(encoding="utf-8")


def test_cli_missing_compare_folder_is_one_line_and_exit_2(tmp_path, capsys):
    smol = folder(tmp_path, "smol", rows(RANK, SMOL_RANK, SMOL))
    capsys.readouterr()
    assert report_main([str(smol), "--compare", str(tmp_path / "nowhere"), "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --compare ") and "nowhere/results.jsonl" in err
    assert not (smol / "report.md").exists()  # nothing written


def test_report_header_names_the_base_model_and_says_a_gguf_is_dequantized(tmp_path):
    from experiments.report.markdown import study_header

    gguf = "/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    for base, needles in [
        (gguf, ["- base model: `SmolLM2-135M-Instruct.Q4_1.gguf`, a GGUF file dequantized", "rounded copy"]),
        ("builtin", ["- base model: the built-in base"]),
        ("/ckpt/opt-125m", ["- base model: `opt-125m`"]),
    ]:
        out = folder(tmp_path, Path(base).name, rows(RANK, SMOL_RANK, SMOL), base=base, in_rows=True)
        header = study_header(load_studies(out)[0])
        assert all(n in header for n in needles), header
    older = folder(tmp_path, "older", rows(RANK, SMOL_RANK, SMOL))  # rows without the column: no line
    assert "base model" not in study_header(load_studies(older)[0])
