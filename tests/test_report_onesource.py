"""One source for each fact the report and the benchmarks share: one markdown table builder with one empty-cell
mark, one MiB, one Check type whose verdict is an enum (never parsed back from text), one way to write a
difference. Checked by behaviour, and by a scan of the sources that no second copy has crept back."""

from __future__ import annotations

import re
from pathlib import Path

import torch

import bench.targets
from bench.train.table import table
from experiments.report import checks, expectations, grid
from experiments.report.checks import Check, Verdict
from experiments.report.fmt import EMPTY, MIB, diff_text, md_table, mib
from experiments.report.stats import Difference

REPO = Path(__file__).resolve().parent.parent
SOURCES = sorted(p for folder in ("experiments", "bench", "training") for p in (REPO / folder).rglob("*.py"))


def test_md_table_escapes_pipes_and_marks_an_empty_cell_with_the_one_mark():
    got = md_table(["a", "b"], [["x", None], ["p|q", ""]])
    assert got == "| a | b |\n|---|---|\n| x | — |\n| p\\|q |  |"
    assert EMPTY == "—"


def test_no_other_module_builds_a_markdown_table_or_defines_a_mib():
    table_rule = re.compile(r"""["']\|?(---\|)+["']|["']\|["']\s*\+\s*["']---""")
    mib_literal = re.compile(r"\b2\s*\*\*\s*20\b|\b1048576\b|=\s*1\s*<<\s*20\b")
    for path in SOURCES:
        if path == REPO / "experiments/report/fmt.py":
            continue
        text = path.read_text(encoding="utf-8")
        assert not table_rule.search(text), f"{path}: builds a markdown table; use experiments.report.fmt.md_table"
        assert not mib_literal.search(text), f"{path}: a MiB constant of its own; use experiments.report.fmt.MIB"
    assert MIB == 1 << 20 and mib(3 * MIB) == "3.0 MiB" and mib(None) == EMPTY


def test_one_check_type_for_the_report_the_grid_and_the_benchmark_targets():
    assert expectations.Check is grid.Check is bench.targets.Check is checks.Check
    defined = [p for p in SOURCES if re.search(r"^class Check\b", p.read_text(encoding="utf-8"), re.M)]
    assert defined == [REPO / "experiments/report/checks.py"]


def test_a_verdict_reads_from_its_enum_and_its_one_seed_flag():
    assert Check("e", "o", Verdict.HELD, one_seed=True).text == "held (1 seed)"
    assert Check("e", "o", Verdict.NOT_HELD_WITHIN_NOISE).text == "did not hold (within noise)"
    assert {v.value for v in Verdict} == {
        "held",
        "partly held",
        "within noise",
        "did not hold",
        "did not hold (within noise)",
        "not testable",
    }


def test_benchmark_targets_judge_in_the_reports_words():
    floor = bench.targets.Target("layer x frozen floor", "ours", 1.06, at_most=True)
    assert floor.check(1.05) == Check("<= 1.06", "1.050", Verdict.HELD)
    assert floor.check(1.10).verdict is Verdict.NOT_HELD
    assert floor.check(None) == Check("<= 1.06", EMPTY, Verdict.NOT_TESTABLE)
    text = bench.targets.render([(floor, floor.check(None))], ["a.json"])
    assert text.splitlines()[-1] == "| layer x frozen floor | ours | — | <= 1.06 | not testable |"


def test_the_training_benchmark_table_marks_an_untimed_row_with_the_one_mark():
    row = {
        "label": "hf lora",
        "trainable": 8192,
        "step_s": None,
        "tokens_per_s": None,
        "mfu": None,
        "memory": {"saved": {"activations": 3 * MIB}, "rss_step_delta": None},
        "loss_initial": 5.0,
        "loss_after": 4.5,
    }
    got = table({"rows": [row], "ratios": []}, torch.device("cpu")).splitlines()
    assert got[0].endswith("| saved MiB | RSS delta MiB | loss0 | loss_after |")
    assert got[2] == "| hf lora | 8,192 | — | — | — | — | 3.0 | — | 5.0000 | 4.5000 |"


def test_a_difference_is_written_by_one_function_in_the_report_and_the_evidence():
    paired = Difference(-3.302, 0.66, 2.0, 0.01, True, "paired", 3)
    one_seed = Difference(1.234, None, None, None, None, None, 1)
    assert diff_text(paired, 235.9) == "-3.302 ± 0.660 (-1.40%), significant, paired"
    assert diff_text(paired, digits=2, unit=" ppl", verdict=False) == "-3.30 ± 0.66 ppl, paired"
    assert diff_text(one_seed, digits=2, unit=" ppl", verdict=False) == "+1.23 ppl, 1 seed"
    within = Difference(0.5, 0.7, 2.0, 0.3, False, "Welch", 2)
    assert diff_text(within) == "+0.500 ± 0.700, within noise, Welch"
