"""summary_rows: a study as one dict of numbers per value (the notebook's pandas table), checked against means,
t-intervals and paired / Welch differences computed here by hand from known rows."""

from __future__ import annotations

import math
import statistics

import pytest
from scipy import stats

from experiments.report.fmt import MIB
from experiments.report.studies import Study, Value, summary_rows
from experiments.sweep.results import device_peak_bytes

PPL = {4: [120.0, 118.0, 123.0], 8: [110.0, 109.5, 112.5], 16: [108.0, 108.0, 111.0]}


def row(seed: int, ppl: float | None, status: str = "ok", **extra) -> dict:
    return {
        "seed": seed,
        "status": status,
        "val_ppl": ppl,
        "train_time_s": 10.0 + seed,
        "tokens_per_s": 1000.0 * (seed + 1),
        "peak_memory_bytes": (300 + seed) * MIB,
        "saved_for_backward_bytes": 12 * MIB,
        "trainable_params": 8192,
        **extra,
    }


def half_t(xs: list[float]) -> float:
    """95% t-interval half-width of the mean of xs, by hand."""
    return stats.t.ppf(0.975, len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))


def rank_study() -> Study:
    values = [Value(r, None, r == 8, [row(s, p) for s, p in enumerate(PPL[r])]) for r in (4, 8, 16)]
    values[0].rows[2] = row(2, None, status="failed")  # rank 4 loses seed 2: it no longer pairs with the baseline
    return Study("lora_rank", "lora.rank", "h", values)


def test_means_intervals_and_paired_difference_from_the_baseline():
    st = rank_study()
    got = summary_rows(st, recommended=st.values[2])
    assert [r["value"] for r in got] == [4, 8, 16]
    assert [(r["baseline"], r["recommended"]) for r in got] == [(False, False), (True, False), (False, True)]
    assert [(r["seeds_ok"], r["seeds"]) for r in got] == [(2, 3), (3, 3), (3, 3)]
    r16, base = got[2], got[1]
    assert r16["val_ppl"] == pytest.approx(statistics.fmean(PPL[16]))
    assert r16["val_ppl_ci"] == pytest.approx(half_t(PPL[16]))
    diffs = [a - b for a, b in zip(PPL[16], PPL[8])]  # the same seed on both sides
    assert r16["delta_val_ppl"] == pytest.approx(statistics.fmean(diffs))
    assert r16["delta_val_ppl_ci"] == pytest.approx(half_t(diffs))
    assert r16["delta_test"] == "paired" and r16["delta_p"] == pytest.approx(stats.ttest_rel(PPL[16], PPL[8]).pvalue)
    scipy_ci = stats.ttest_rel(PPL[16], PPL[8]).confidence_interval(0.95)  # scipy's own paired interval
    assert scipy_ci.high < 0  # excludes zero: rank 16 is better than rank 8 beyond noise at every reading
    assert r16["delta_significant"] is True
    assert base["delta_val_ppl"] is None and base["delta_test"] is None
    assert r16["train_time_s"] == pytest.approx(11.0) and r16["train_time_s_ci"] == pytest.approx(half_t([10, 11, 12]))
    assert r16["tokens_per_s"] == pytest.approx(2000.0)
    assert r16["peak_memory_mib"] == pytest.approx(301.0) and r16["saved_for_backward_mib"] == pytest.approx(12.0)
    assert r16["trainable_params"] == 8192


def test_a_value_missing_a_seed_is_compared_by_welch_over_its_finished_runs():
    got = summary_rows(rank_study())[0]
    ok = PPL[4][:2]
    assert got["val_ppl"] == pytest.approx(statistics.fmean(ok)) and got["val_ppl_ci"] == pytest.approx(half_t(ok))
    welch = stats.ttest_ind(ok, PPL[8], equal_var=False)
    assert got["delta_test"] == "Welch" and got["delta_p"] == pytest.approx(welch.pvalue)
    assert got["delta_val_ppl"] == pytest.approx(statistics.fmean(ok) - statistics.fmean(PPL[8]))


def test_one_seed_gives_means_without_intervals_or_verdicts():
    st = Study(
        "lora_rank", "lora.rank", "h", [Value(4, None, True, [row(0, 120.0)]), Value(8, None, False, [row(0, 110.0)])]
    )
    got = summary_rows(st)[1]
    assert got["val_ppl"] == 110.0 and got["val_ppl_ci"] is None and got["train_time_s_ci"] is None
    assert got["delta_val_ppl"] == pytest.approx(-10.0)
    assert got["delta_val_ppl_ci"] is None and got["delta_significant"] is None and got["delta_test"] is None
    assert not any(r["recommended"] for r in summary_rows(st))  # no recommendation passed, none flagged


def test_source_ppl_and_forgetting_when_measured_none_otherwise():
    rows = [row(s, 100.0 + s, source_val_ppl=50.0 + 2 * s, forgetting=0.01 * (s + 1)) for s in range(3)]
    st = Study("lora_rank", "lora.rank", "h", [Value(4, None, True, rows)])
    got = summary_rows(st)[0]
    assert got["source_val_ppl"] == pytest.approx(52.0) and got["source_val_ppl_ci"] == pytest.approx(
        half_t([50, 52, 54])
    )
    assert got["forgetting"] == pytest.approx(0.02)
    bare = summary_rows(rank_study())[1]
    assert bare["source_val_ppl"] is None and bare["source_val_ppl_ci"] is None and bare["forgetting"] is None


def test_no_baseline_means_no_differences():
    st = Study("x", "lora.rank", "h", [Value(4, None, False, [row(0, 120.0), row(1, 121.0)])])
    assert summary_rows(st)[0]["delta_val_ppl"] is None


def test_peak_memory_is_the_allocator_peak_on_a_gpu_and_the_rss_on_cpu():
    gpu = {"device": "NVIDIA H100 80GB HBM3", "peak_allocated_bytes": 3 << 30, "peak_rss_bytes": None}
    cpu = {"device": "cpu (AMD EPYC, 2 threads)", "peak_allocated_bytes": None, "peak_rss_bytes": 5 << 30}
    assert device_peak_bytes(gpu) == 3 << 30 and device_peak_bytes(cpu) == 5 << 30
    assert device_peak_bytes({"device": "cpu"}) is None  # an old row without memory figures


def test_an_lr_grid_is_summarised_at_each_values_chosen_lr():
    grid = {lr: [row(s, 100.0 * lr * 1000 + s, tune_loss=abs(lr - 3e-3)) for s in range(2)] for lr in (1e-3, 3e-3)}
    v = Value(4, None, True, grid=grid)
    v.choose_lr()  # the lowest tune loss: 3e-3
    got = summary_rows(Study("lora_rank", "lora.rank", "h", [v]))[0]
    assert got["chosen_lr"] == 3e-3 and got["val_ppl"] == pytest.approx(300.5) and got["seeds"] == 2
    assert summary_rows(rank_study())[0]["chosen_lr"] is None
