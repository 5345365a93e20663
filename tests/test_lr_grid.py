"""The learning-rate grid: expansion and validation of `ablation.lr_grid`, the tune split, the choice of each value's
lr by its tune loss (never by the reported validation loss), and alpha policies kept in tables of their own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data import load_corpus, split_corpus, split_tune
from experiments.config.config import ConfigError, load_config, with_values
from experiments.report.markdown import write_report
from experiments.report.studies import load_studies
from experiments.sweep.plan import plan_runs

REPO = Path(__file__).resolve().parent.parent
RANK = str(REPO / "experiments/configs/abl_lora_rank.yaml")


def grid_config(grid="3e-3,1e-2", values=(4, 16)):
    cfg = load_config(RANK)
    return with_values(cfg, [("ablation.lr_grid", grid, "test"), ("ablation.values", list(values), "test")])


def test_grid_expands_every_value_at_every_lr_and_seed():
    specs = plan_runs(grid_config(), name="lora_rank", seeds=2)
    assert len(specs) == 2 * 2 * 2
    assert {(s.value, s.cfg.train.lr, s.seed) for s in specs} == {
        (v, lr, seed) for v in (4, 16) for lr in (3e-3, 1e-2) for seed in (0, 1)
    }
    assert len({s.config_hash for s in specs}) == 8  # each (value, lr, seed) is its own run: resume works per run
    assert len({s.study_hash for s in specs}) == 1  # one table: the lr is a dimension of it, not another study
    assert all(s.cfg.data.tune_fraction == 0.1 for s in specs)
    assert all("-lr" in s.name for s in specs)


def test_without_a_grid_nothing_changes():
    specs = plan_runs(load_config(RANK), name="lora_rank", seeds=1)
    assert all(s.cfg.data.tune_fraction == 0.0 and s.cfg.train.lr == 1e-2 for s in specs)
    assert len(specs) == 5 and not any("-lr" in s.name for s in specs)
    other_lr = plan_runs(with_values(load_config(RANK), [("train.lr", 3e-3, "t")]), name="lora_rank")
    assert specs[0].study_hash != other_lr[0].study_hash  # outside a grid, another lr is another study


@pytest.mark.parametrize(
    "grid, match",
    [
        ("1e-2", "at least two distinct"),
        ("1e-2,1e-2", "at least two distinct"),
        ("-1e-3,1e-2", r"lr_grid\[0\]' must be in \(0, inf\)"),
        ("fast,slow", r"lr_grid\[0\]' must be a number"),
    ],
)
def test_grid_is_validated(grid, match):
    with pytest.raises(ConfigError, match=match):
        grid_config(grid)


SWEEP_LR = [
    ("ablation.key", "train.lr", "t"),
    ("ablation.values", [1e-3, 2.5e-2], "t"),
    ("ablation.baseline", 1e-3, "t"),
]


def test_an_lr_ablation_without_a_grid_trains_each_value_at_its_own_lr():
    specs = plan_runs(with_values(load_config(RANK), SWEEP_LR), name="lr", seeds=2)
    assert [(s.value, s.cfg.train.lr) for s in specs] == [(1e-3, 1e-3), (2.5e-2, 2.5e-2)] * 2


def test_a_grid_over_an_lr_ablation_is_refused():
    sweep_lr = SWEEP_LR
    with pytest.raises(ConfigError, match="already sweeps train.lr"):
        with_values(load_config(RANK), [*sweep_lr, ("ablation.lr_grid", "1e-3,1e-2", "t")])


def test_tune_split_is_disjoint_from_training_and_validation(tmp_path, isolated_cache):
    for i in range(60):
        (tmp_path / f"doc{i}.txt").write_text(f"document {i}\n" * 5)
    corpus = load_corpus(str(tmp_path))
    train, val = split_corpus(corpus, 0.1)
    rest, tune = split_tune(train, 0.1, 0.2)
    names = [{n for n, _ in c.docs} for c in (rest, tune, val)]
    assert all(names) and not (names[0] & names[1]) and not (names[1] & names[2]) and not (names[0] & names[2])
    assert names[0] | names[1] == {n for n, _ in train.docs}  # validation is exactly what it is without a grid
    assert tune.name.endswith("-tune") and tune.fingerprint not in (train.fingerprint, val.fingerprint)


def grid_row(value, lr, seed, tune_loss, val_ppl, policy="fixed", study="s1"):
    return {
        "ablation": "lora_rank",
        "key": "lora.rank",
        "value": value,
        "value_index": None,
        "is_baseline": value == 16,
        "seed": seed,
        "status": "ok",
        "lr": lr,
        "tune_loss": tune_loss,
        "val_ppl": val_ppl + seed,
        "alpha_policy": policy,
        "config_hash": f"{study}-{value}-{lr}-{seed}",
        "study_hash": study,
        "run_dir": f"runs/{study}-{value}-{lr}-{seed}",
        "train_tokens": 4096,
        "trainable_params": 1000 * value,
        "device": "cpu (test)",
    }


def test_chosen_lr_is_the_tune_argmin_and_never_looks_at_validation(tmp_path):
    # Planted so that tune and validation disagree: at lr 0.03 validation is far better, the tune split worse.
    rows = [
        grid_row(v, lr, s, tune, val)
        for s in (0, 1)
        for v in (4, 16)
        for lr, tune, val in ((0.003, 3.0, 150.0), (0.01, 2.0, 140.0), (0.03, 2.5, 90.0))
    ]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (st,) = load_studies(tmp_path)
    assert st.lr_grid == [0.003, 0.01, 0.03]
    assert [v.chosen_lr for v in st.values] == [0.01, 0.01]
    assert all(r["lr"] == 0.01 for v in st.values for r in v.rows) and len(st.rows) == 12
    write_report(tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "| chosen lr |" in report and "| 0.01 |" in report
    assert "140.500" in report and "90.500" not in report  # the table reports validation at the chosen lr
    assert "edge of the grid" not in report
    assert (tmp_path / "plots" / "lora_rank_lr.png").read_bytes()[:4] == b"\x89PNG"


def test_a_choice_at_the_edge_of_the_grid_is_flagged(tmp_path):
    rows = [grid_row(16, lr, 0, tune, 100.0) for lr, tune in ((0.003, 3.0), (0.01, 2.0), (0.03, 1.0))]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_report(tmp_path)
    assert "rank 16 is at an edge of the grid" in (tmp_path / "report.md").read_text()


def test_alpha_policies_stay_in_tables_of_their_own(tmp_path):
    rows = [grid_row(v, 0.01, 0, 2.0, 100.0 + v, policy=p, study=p) for p in ("fixed", "rslora") for v in (4, 16)]
    for r in rows:  # no grid here: one lr per value
        r.pop("tune_loss")
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    studies = load_studies(tmp_path)
    assert len(studies) == 2 and {len(st.rows) for st in studies} == {2}
    write_report(tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "## lora_rank, alpha policy fixed" in report and "## lora_rank, alpha policy rslora" in report


def test_rslora_from_the_command_line_is_its_own_study():
    base = plan_runs(load_config(RANK), name="lora_rank")
    rs = plan_runs(with_values(load_config(RANK), [("lora.alpha_policy", "rslora", "--set")]), name="lora_rank")
    assert {s.study_hash for s in base}.isdisjoint({s.study_hash for s in rs})


@pytest.mark.slow
def test_quick_grid_end_to_end_resumes_after_a_kill(tmp_path, toy_corpora):
    """2 values x 2 learning rates through the real CLI; Ctrl-C inside the grid, then the same command finishes it
    without training any finished (value, lr) again."""
    toy_corpora(tmp_path)
    out = tmp_path / "out"
    env = dict(os.environ, SLM_LORA_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(REPO))
    env.pop("WANDB_PROJECT", None)
    args = [sys.executable, "-m", "experiments.run", "--config", RANK, "--quick", "--no-progress", "--out", str(out)]
    args += ["--data", str(tmp_path / "ft"), "--set", f"pretrain.corpus={tmp_path / 'pt'}", "--lr-grid", "3e-3,3e-2"]
    args += ["--set", "ablation.values=[2, 4]", "--set", "ablation.baseline=2", "--set", "train.checkpoint_every=1"]
    args += ["--set", "data.val_fraction=0.2", "--set", "eval.max_tokens=1024", "--set", "eval.source_max_tokens=1024"]
    proc = subprocess.Popen(args, env=env, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    while not (out / "results.jsonl").exists():  # one (value, lr) finished: stop inside the grid
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    first = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert 1 <= len(first) < 4

    done = subprocess.run(args, env=env, cwd=REPO, text=True, capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted((r["value"], r["lr"]) for r in rows) == [(2, 0.003), (2, 0.03), (4, 0.003), (4, 0.03)]
    assert all(r["status"] == "ok" and r["tune_loss"] > 0 for r in rows)  # no (value, lr) trained twice
    assert len({r["val_loss"] for r in rows}) == 4 and len({r["study_hash"] for r in rows}) == 1
    report = (out / "report.md").read_text()
    assert "| chosen lr |" in report and (out / "plots" / "lora_rank_lr.png").exists()
