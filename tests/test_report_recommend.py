"""The recommended value per study (cheapest value within noise of the best, paired over seeds) and the Pareto
front it sits on, on studies built from rows with known numbers."""

from __future__ import annotations

import math
import statistics

import pytest
import scipy.stats

from experiments.report.recommend import RULE, _cheaper_by, front, pareto_front, recommend
from experiments.report.studies import Study, Value

SHIFT = (-4.0, 0.0, 4.0)  # what each seed does to every value alike: paired tests remove it
# `noise` is each value's own seed-to-seed wobble; values with the same noise differ by a constant at every seed.


def value(v, ppl, params, time=10.0, seeds=3, noise=(0.0, 0.05, -0.05), baseline=False) -> Value:
    rows = [
        {
            "seed": s,
            "status": "ok",
            "val_ppl": ppl + SHIFT[s] + noise[s],
            "trainable_params": params,
            "train_time_s": time + 0.1 * s,
            "peak_memory_bytes": 2**28,
        }
        for s in range(seeds)
    ]
    return Value(v, None, baseline, rows)


def study(key, values) -> Study:
    return Study(key.split(".")[-1], key, "h", values)


def test_cheapest_value_within_noise_of_the_best_is_recommended():
    st = study(
        "lora.rank",
        [
            value(4, 120.0, 8192),
            value(8, 110.02, 16384, noise=(0.1, -0.1, 0.0)),
            value(16, 110.0, 32768, baseline=True),
            value(32, 112, 65536),
        ],
    )
    rec = recommend(st)
    assert rec.best.value == 16 and rec.value.value == 8 and not rec.provisional
    assert rec.diff.test == "paired" and rec.diff.significant is False
    # per-seed differences rank 8 - rank 16: the two noises' difference (SHIFT is common); its t-interval by scipy
    diffs = [a - b for a, b in zip((0.1, -0.1, 0.0), (0.0, 0.05, -0.05))]
    half = scipy.stats.t.ppf(0.975, 2) * statistics.stdev(diffs) / math.sqrt(3)
    mean = 0.02 + statistics.mean(diffs)
    want = f"rank 8: within noise of the best (rank 16: {mean:+.2f} ± {half:.2f} ppl, paired), 2.0× fewer trainable"
    assert rec.evidence == want + " parameters"  # the exact sentence: no verdict word inside the brackets


def test_best_value_when_every_cheaper_one_is_significantly_worse():
    st = study("lora.rank", [value(4, 120.0, 8192), value(8, 111.0, 16384), value(16, 110.0, 32768)])
    rec = recommend(st)
    assert rec.value is rec.best and rec.best.value == 16 and rec.diff is None
    assert "every cheaper value is significantly worse (nearest, rank 8: +1.00 ± " in rec.evidence
    alone = study("lora.rank", [value(4, 100.0, 8192), value(8, 110.0, 16384)])
    assert recommend(alone).evidence == "rank 4: the best perplexity (100.00) and the cheapest value"


def test_equal_parameters_fall_back_to_train_time():
    st = study(
        "model.max_position_embeddings",
        [
            value(256, 100.01, 32768, time=5.0, noise=(0.1, -0.1, 0.0)),
            value(512, 100.0, 32768, time=8.0),
            value(1024, 100.0, 32768, 12.0),
        ],
    )
    rec = recommend(st)
    assert rec.value.value == 256 and rec.evidence.endswith("1.6× less train time")


def test_one_seed_recommends_the_best_provisionally():
    st = study("lora.rank", [value(4, 100.1, 8192, seeds=1), value(8, 100.0, 16384, seeds=1)])
    rec = recommend(st)
    assert rec.value.value == 8 and rec.provisional
    assert "provisional" in rec.evidence and "--seeds 3" in rec.evidence
    assert "with one seed" in RULE
    assert recommend(study("lora.rank", [Value(4, None, False, [{"seed": 0, "status": "failed"}])])) is None


def test_pareto_front_by_hand():
    # (cost, ppl): 1 is beaten by 0 on both, 3 ties 2 exactly (both kept), 4 is beaten by 2 on ppl at equal cost.
    points = [(1.0, 10.0), (2.0, 11.0), (3.0, 8.0), (3.0, 8.0), (3.0, 9.0), (5.0, 7.0)]
    assert pareto_front(points) == [0, 2, 3, 5]
    assert pareto_front([(1.0, 10.0), (2.0, 10.0)]) == [0]  # the same ppl at a higher cost is beaten
    assert pareto_front([]) == []


def test_front_of_a_study_cheapest_first():
    st = study(
        "lora.rank",
        [value(64, 99.0, 131072, time=30.0), value(4, 120.0, 8192, time=10.0), value(8, 125.0, 16384, time=9.0)],
    )
    assert [v.value for v in front(st, "trainable_params")] == [4, 64]  # rank 8: more params and worse ppl than 4
    assert [v.value for v in front(st, "train_time_s")] == [8, 4, 64]  # rank 8 is the fastest


@pytest.mark.parametrize("missing,params", [("trainable_params", 8192), ("train_time_s", 16384)])
def test_a_value_without_a_cost_is_never_the_cheapest(missing, params):
    cheap = value(4, 100.0, params, time=1.0)
    for r in cheap.rows:
        r[missing] = None
    st = study("lora.rank", [cheap, value(8, 100.0, 16384, time=50.0)])
    assert recommend(st).value.value == 8


def test_front_leaves_out_a_value_without_perplexity_or_without_the_cost():
    failed = Value(2, None, False, [{"seed": 0, "status": "failed", "trainable_params": 4096, "train_time_s": 1.0}])
    untimed = value(8, 100.0, 16384)
    for r in untimed.rows:
        r["train_time_s"] = None  # e.g. rows written before the column existed
    st = study("lora.rank", [failed, value(4, 120.0, 8192), untimed, value(64, 99.0, 131072)])
    assert [v.value for v in front(st, "trainable_params")] == [4, 8, 64]
    assert [v.value for v in front(st, "train_time_s")] == [64]  # equal times: rank 64 has the better ppl


def test_cheaper_by_names_the_first_cost_that_is_lower_as_a_ratio():
    a, b = value(4, 100.0, 8192, time=0.5), value(8, 100.0, 8192, time=2.0)  # equal params, sub-second times
    assert _cheaper_by(a, b) == "3.5× less train time"  # mean times 0.6 s and 2.1 s
    assert _cheaper_by(b, b) == "no cheaper"
    free = value(4, 100.0, 0, time=0.5)  # a zero cost is no ratio: the next cost is named
    assert _cheaper_by(free, b) == "3.5× less train time"


def test_one_seed_best_value_says_worse_not_significantly_worse():
    st = study("lora.rank", [value(4, 100.1, 8192, seeds=1), value(8, 100.0, 16384, seeds=1)])
    assert recommend(st).evidence == (
        "rank 8: the best perplexity (96.00); every cheaper value is worse (nearest, rank 4: +0.10 ppl, 1 seed); "
        "provisional: one seed per value cannot tell a difference from noise (rerun with --seeds 3)"
    )
