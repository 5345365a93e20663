"""The report of a grid study on planted numbers: main effects, simple effects and interaction contrasts against
scipy's one-sample t-interval on the per-seed contrasts; the two-way tables, heatmaps, words, literature verdicts,
Pareto front and the choice under a budget; one-key studies get nothing new."""

from __future__ import annotations

import functools
import shutil
import statistics
from pathlib import Path

import pytest
from scipy import stats
from test_grid import GRID_YAML, Fake, planted, quiet

from experiments.config.config import load_config, with_values
from experiments.report.checks import Verdict
from experiments.report.expectations import expectations
from experiments.report.grid import (
    Budget,
    grid_of,
    grid_section,
    interaction,
    is_rung,
    literature_checks,
    main_effect,
    recommend,
    simple_effect,
    within_budget,
)
from experiments.report.markdown import main as report_main
from experiments.report.markdown import write_report
from experiments.report.studies import Study, Value, load_studies
from experiments.sweep.plan import plan_runs
from experiments.sweep.sweep import run_sweep

REPO = Path(__file__).resolve().parent.parent
QV, ATT, ALL = "q_proj,v_proj", "attention", "attention,mlp"
SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def grid_dir(tmp_path_factory) -> Path:
    """A results folder of the built-in grid, 3 seeds, with the planted numbers."""
    out = tmp_path_factory.mktemp("grid")
    run_sweep(plan_runs(load_config(GRID_YAML), name="x", seeds=3), out, Fake(), say=quiet)
    return out


@functools.cache
def y(rank: int, modules: str, seed: int) -> float:
    """The planted val ppl of a cell at a seed, straight from the fake runner's formula."""
    cfg = with_values(load_config(), [("lora.rank", rank, "t"), ("lora.target_modules", modules, "t")])
    return planted(with_values(cfg, [("train.seed", seed, "t")]))["val_ppl"]


def scipy_interval(xs: list[float]) -> tuple[float, float, float]:
    """mean, CI half-width and p of a one-sample t-test of xs against 0, as scipy computes them."""
    res = stats.ttest_1samp(xs, 0.0)
    ci = res.confidence_interval(0.95)
    return statistics.fmean(xs), (ci.high - ci.low) / 2, float(res.pvalue)


def same(d, xs: list[float]) -> None:
    mean, half, p = scipy_interval(xs)
    assert d.diff == pytest.approx(mean, abs=1e-12) and d.half == pytest.approx(half, rel=1e-12)
    assert d.p == pytest.approx(p, rel=1e-9) and d.significant == (abs(mean) > half) and d.n == len(xs)


def test_interaction_main_and_simple_effects_match_scipy_on_planted_numbers(grid_dir):
    (st,) = load_studies(grid_dir)
    g = grid_of(st)
    assert g.keys == ["lora.rank", "lora.target_modules"] and g.axes == [[4, 16, 64], [QV, ATT, ALL]]
    at = g.baseline
    assert at == (16, QV)
    # Interaction of the extreme 2x2: (y[64,all] - y[64,qv]) - (y[4,all] - y[4,qv]), seed by seed.
    xs = [(y(64, ALL, s) - y(64, QV, s)) - (y(4, ALL, s) - y(4, QV, s)) for s in SEEDS]
    d = interaction(g, 0, 1, 4, 64, QV, ALL, at)
    same(d, xs)
    assert d.diff == pytest.approx(4.0, abs=1.2) and d.significant  # planted: rank helps by 4 under q,v only
    # Main effect of rank 16 -> 64: averaged over the three module sets, seed by seed.
    xs = [statistics.fmean(y(64, m, s) - y(16, m, s) for m in (QV, ATT, ALL)) for s in SEEDS]
    same(main_effect(g, 0, 16, 64), xs)
    # Main effect of modules q,v -> attention,mlp, averaged over the ranks.
    xs = [statistics.fmean(y(r, ALL, s) - y(r, QV, s) for r in (4, 16, 64)) for s in SEEDS]
    same(main_effect(g, 1, QV, ALL), xs)
    # Simple effects of rank under each module set: planted -4 under q,v, 0 (noise only) elsewhere.
    under_qv = simple_effect(g, 0, 4, 64, (16, QV))
    same(under_qv, [y(64, QV, s) - y(4, QV, s) for s in SEEDS])
    assert under_qv.significant and under_qv.diff == pytest.approx(-4.0, abs=0.6)
    under_all = simple_effect(g, 0, 4, 64, (16, ALL))
    assert under_all.significant is False


def test_grid_report_tables_words_verdicts_and_plots(grid_dir):
    write_report(grid_dir)
    text = (grid_dir / "report.md").read_text()
    assert "### Two-way tables" in text and "| rank \\ modules | q,v | attention | attention,mlp |" in text
    assert "| rank 16 | " in text and "baseline" in text
    assert "rank matters with q,v but not with attention, attention,mlp" in text
    assert "### Main effects and interaction" in text and "rank 16 → rank 64" in text
    assert "Pareto front against trainable parameters" in text
    # The recommended combination, by the same rule as a one-key study's: the cheapest within noise of the best.
    assert "**rank_x_modules** (`lora.rank × lora.target_modules`): rank 4 × attention,mlp" in text
    assert (grid_dir / "plots" / "rank_x_modules_grid.png").stat().st_size > 10_000
    assert "![rank_x_modules: val ppl and Δ vs baseline](plots/rank_x_modules_grid.png)" in text
    assert "Expected vs observed: interactions in the literature" in text


def test_literature_verdicts_come_from_the_table(grid_dir):
    (st,) = load_studies(grid_dir)
    table5, qlora, biderman = literature_checks(grid_of(st))
    # Table 5: 4 x attention,mlp (9,216 params) beats 16 x q,v (8,192), and 16 x attention,mlp beats 64 x q,v.
    assert table5.verdict is Verdict.HELD and table5.observed.count("; ") == 1
    assert table5.observed.startswith("attention,mlp at rank 4 vs q,v at rank 16 (9,216 vs 8,192 params): -3.99 ± ")
    assert "; attention,mlp at rank 16 vs q,v at rank 64 (36,864 vs 32,768 params)" in table5.observed
    assert qlora.verdict is Verdict.HELD  # planted: with attention + MLP the rank changes nothing beyond noise
    # Planted: every attention + MLP cell is equally good, so "a higher rank is best" cannot be told from noise.
    assert biderman.verdict in (Verdict.WITHIN_NOISE, Verdict.NOT_HELD_WITHIN_NOISE)


def test_budget_restricts_the_choice_and_flags_reach_the_report(grid_dir, capsys):
    (st,) = load_studies(grid_dir)
    budget = Budget(max_trainable_params=10_000)
    allowed = within_budget(st, budget)
    assert sorted(v.mean("trainable_params") for v in allowed.values) == [2048, 4096, 8192, 9216]
    assert recommend(allowed).value.value == "4 × attention,mlp"
    tight = Budget(max_trainable_params=5000, max_train_time_s=12.5)  # 4 x q,v: 10 s; 4 x attention: 12 s
    assert [v.value for v in within_budget(st, tight).values] == ["4 × q_proj,v_proj", "4 × attention"]
    assert not within_budget(st, Budget(max_memory_mib=100)).values  # every fake run peaks at 256 MiB
    assert report_main([str(grid_dir), "--no-plots", "--max-trainable-params", "5000", "--max-train-time", "12.5"]) == 0
    text = (grid_dir / "report.md").read_text()
    assert "**Under the budget** (≤ 5,000 trainable parameters, ≤ 12.5 s train time): rank 4 × attention" in text
    assert report_main([str(grid_dir), "--no-plots", "--max-memory", "100"]) == 0
    assert "**Under the budget** (≤ 100.0 MiB peak memory): no cell fits" in (grid_dir / "report.md").read_text()
    bad_values = (["--max-trainable-params", "0"], ["--max-trainable-params", "2.5"], ["--max-train-time", "x"])
    for bad in (*bad_values, ["--max-memory", "-1"], ["--max-memory", "inf"]):
        with pytest.raises(SystemExit) as e:
            report_main([str(grid_dir), *bad])
        assert e.value.code == 2
    assert "expected a positive" in capsys.readouterr().err


def test_one_key_studies_get_nothing_new(tmp_path):
    """The committed default study: no grid section, no rung, and its recommended values as before."""
    shutil.copy(REPO / "docs/default_study/results.jsonl", tmp_path / "results.jsonl")
    studies = load_studies(tmp_path)
    assert [s.ablation for s in studies] == ["lora_rank", "target_modules", "context_length"]
    assert all(grid_section(s, studies) == [] and not is_rung(s) for s in studies)
    assert [s.named(recommend(s).value) for s in studies] == ["rank 64", "q,k,v,o,fc1,fc2", "context 256"]


def _context_study(ppl: dict[int, list[float]]) -> Study:
    """A context study from planted val ppl per length and seed."""
    values = [
        Value(n, i, n == 512, rows=[{"status": "ok", "seed": s, "val_ppl": y} for s, y in enumerate(ys)])
        for i, (n, ys) in enumerate(ppl.items())
    ]
    return Study("context_length", "model.max_position_embeddings", "h", values)


def _ppl_check(st: Study):
    return next(c for c in expectations(st) if c.expected.startswith("Longer context lowers"))


def test_context_verdict_never_hides_a_significant_effect_the_other_way(tmp_path):
    """The committed default study: 512 is within noise of 256, but 1024 and 2048 are significantly worse than 512,
    so "longer context lowers perplexity" did not hold (it read "within noise" before)."""
    shutil.copy(REPO / "docs/default_study/results.jsonl", tmp_path / "results.jsonl")
    st = next(s for s in load_studies(tmp_path) if s.ablation == "context_length")
    check = _ppl_check(st)
    assert check.verdict is Verdict.NOT_HELD
    assert "; longer than 512 is significantly worse: 1024: +" in check.observed and ", 2048: +" in check.observed
    # Planted: a significant gain from 256 to 512, then a significant loss: partly held.
    gain_then_loss = {256: [110.0, 111.0, 112.5], 512: [100.0, 101.2, 102.0], 1024: [105.0, 106.1, 107.0]}
    assert _ppl_check(_context_study(gain_then_loss)).verdict is Verdict.PARTLY_HELD
    # A steady gain with length: held, nothing said against it.
    steady = {256: [110.0, 111.0, 112.5], 512: [100.0, 101.2, 102.0], 1024: [95.0, 96.1, 97.3]}
    check = _ppl_check(_context_study(steady))
    assert check.verdict is Verdict.HELD and "significantly worse" not in check.observed


@pytest.mark.slow
def test_notebook_shows_a_grid_and_the_choice_under_a_budget(grid_dir, monkeypatch):
    """The analysis notebook, headless, on the grid folder: its grid section shows the two-way table, the words and
    the heatmap, and a budget set in the cell picks the best cell within it."""
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("SLM_LORA_RESULTS", str(grid_dir))
    path = REPO / "notebooks" / "ablation_analysis.ipynb"
    nb = nbformat.read(path, as_version=4)
    (cell,) = [c for c in nb.cells if c.cell_type == "code" and "BUDGET = Budget(" in c.source]
    cell.source = cell.source.replace("max_trainable_params=None", "max_trainable_params=10_000")
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    shown = "".join(o.get("data", {}).get("text/markdown", "") for o in cell.outputs)
    assert "| rank \\ modules | q,v | attention | attention,mlp |" in shown
    assert "rank matters with q,v but not with attention, attention,mlp" in shown
    assert "**Under the budget** (≤ 10,000 trainable parameters): rank 4 × attention,mlp" in shown
    assert sum("image/png" in o.get("data", {}) for o in cell.outputs) == 1  # the heatmaps of the one key pair
