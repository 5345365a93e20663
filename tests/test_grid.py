"""Grid studies without training: expansion of `ablation.grid` and `--grid` into cells x seeds, validation, resume
after a kill with nothing run twice, the rows (readable with pandas), and the command line's grid flags.

A fake runner stands in for training (tests/test_run_sweep.py does the same for one-key ablations)."""

from __future__ import annotations

import random
from pathlib import Path

import pandas as pd
import pytest

from experiments.config.config import CONFIG_DIR, ConfigError, from_dict, load_config
from experiments.run import build_parser, main, resolve_runs
from experiments.sweep.grid import SEP, parse_grid_flag, split_value
from experiments.sweep.plan import plan_runs, plan_states
from experiments.sweep.results import RESULTS_JSONL, read_rows
from experiments.sweep.sweep import run_sweep
from training.checkpoint import CHECKPOINT_FILE

GRID_YAML = CONFIG_DIR / "abl_rank_x_modules.yaml"
RANKS = (4, 16, 64)
MODULES = (("q_proj", "v_proj"), ("attention",), ("attention", "mlp"))
WIDTH = {0: 512, 1: 1024, 2: 2304}  # trainable parameters per unit of rank, as on the built-in base (d_model 128)


def planted(cfg) -> dict:
    """What a run would report, from numbers planted per cell: rank lowers ppl by 2 per step under q,v only, each
    wider module set lowers it by 3, every seed shifts every cell alike, and a small noise per cell and seed. The
    tune loss ranks cells by grid order (the opposite of val ppl), so a choice by tune loss is told from one by val."""
    ri, mi = RANKS.index(cfg.lora.rank), MODULES.index(tuple(cfg.lora.target_modules))
    seed = cfg.train.seed
    noise = random.Random(f"{ri}-{mi}-{seed}").uniform(-0.3, 0.3)
    ppl = 100.0 - (2.0 * ri if mi == 0 else 0.0) - 3.0 * mi + 1.5 * seed + noise
    return {
        "status": "ok",
        "val_loss": 4.6,
        "val_ppl": ppl,
        "tune_loss": 1.0 + 0.01 * (3 * ri + mi) + 0.001 * seed,
        "train_tokens": cfg.train.tokens,
        "steps": 4,
        "train_time_s": 10.0 + ri + 2 * mi,
        "tokens_per_s": 1000.0,
        "trainable_params": cfg.lora.rank * WIDTH[mi],
        "total_params": 10**6,
        "peak_rss_bytes": 2**28,
        "device": "cpu (fake)",
        "dtype": "float32",
        "world_size": 1,
    }


class Fake:
    """A runner that records (run name, train tokens, resume) per call; `kill_at`: on that call it leaves a
    checkpoint and raises KeyboardInterrupt, as Ctrl-C in the middle of a run would."""

    def __init__(self, kill_at: int | None = None) -> None:
        self.calls: list[tuple[str, int, bool]] = []
        self.kill_at = kill_at

    def __call__(self, spec, run_dir: Path, resume: bool) -> dict:
        self.calls.append((spec.name, spec.cfg.train.tokens, resume))
        if len(self.calls) == self.kill_at:
            (run_dir / CHECKPOINT_FILE).write_bytes(b"half a run")
            raise KeyboardInterrupt
        return planted(spec.cfg)


def quiet(_: str) -> None:
    pass


def grid_dict(grid, **ablation) -> dict:
    d = load_config().to_dict()
    d["ablation"] = {"name": "g", "grid": grid, **ablation}
    return d


def test_builtin_grid_expands_every_cell_at_every_seed_and_shares_the_baseline_run():
    specs = plan_runs(load_config(GRID_YAML), name="x", seeds=3)
    assert len(specs) == 27
    # Seed-major, the last key fastest: every cell at seed 0 first.
    assert [(s.cfg.lora.rank, tuple(s.cfg.lora.target_modules)) for s in specs[:9]] == [
        (r, m) for r in RANKS for m in MODULES
    ]
    assert [s.seed for s in specs] == [i // 9 for i in range(27)]
    assert {s.key for s in specs} == {f"lora.rank{SEP}lora.target_modules"}
    assert specs[0].value == f"4{SEP}q_proj,v_proj" and specs[5].value == f"16{SEP}attention,mlp"
    assert [s.value_index for s in specs[:9]] == list(range(9))
    assert len({s.config_hash for s in specs}) == 27 and len({s.study_hash for s in specs}) == 1
    base = [s for s in specs if s.is_baseline]
    assert [(s.cfg.lora.rank, s.seed) for s in base] == [(16, 0), (16, 1), (16, 2)]
    # The baseline cell is the rank ablation's baseline run: in one results folder it is trained once.
    rank = plan_runs(load_config(CONFIG_DIR / "abl_lora_rank.yaml"), name="r", seeds=1)
    assert base[0].config_hash == next(s.config_hash for s in rank if s.is_baseline)
    assert split_value(specs[3].value) == [16, "q_proj,v_proj"]


@pytest.mark.parametrize(
    "grid, extra, needle",
    [
        ({"lora.rank": [4, 16]}, {}, "two or more keys"),
        ([4, 16], {}, "two or more keys"),
        ({"lora.rank": [4, 16], "lora.alpha": [8.0]}, {"key": "lora.rank", "values": [4]}, "remove ablation.key"),
        ({"lora.rank": [4, 4], "lora.alpha": [8.0]}, {}, "list of distinct values"),
        ({"lora.rank": [], "lora.alpha": [8.0]}, {}, "list of distinct values"),
        ({"lora.rank": [4, 0], "lora.alpha": [8.0]}, {}, "lora.rank=0"),
        ({"lora.rank": [4], "lora_rank": [8]}, {}, "names a key twice"),
        ({"lora.rank": [4], "train.seed": [1, 2]}, {}, "train.seed"),
        ({"lora.rank": [4], "lora.nope": [1]}, {}, "'lora.nope' is not a config key"),
        ({"lora.rank": [4, 16], "lora.alpha": [8.0]}, {"baseline": {"lora.rank": 8}}, "ablation.baseline"),
        ({"lora.rank": [4, 16], "lora.alpha": [8.0]}, {"baseline": 4}, "ablation.baseline"),
    ],
)
def test_grid_is_validated_before_any_work(grid, extra, needle):
    with pytest.raises(ConfigError, match=needle):
        from_dict(grid_dict(grid, **extra), "g.yaml")


def test_halving_needs_a_grid():
    d = load_config(CONFIG_DIR / "abl_lora_rank.yaml").to_dict()
    d["ablation"]["halving"] = True
    with pytest.raises(ConfigError, match="halving needs a grid"):
        from_dict(d, "r.yaml")


def test_grid_baseline_names_a_cell_and_a_grid_round_trips_through_its_saved_config():
    grid = {"lora.rank": [4, 16], "target_modules": [["q_proj", "v_proj"], "attention"]}  # an alias as a key
    cfg = from_dict(grid_dict(grid, baseline={"target_modules": "attention"}))
    specs = plan_runs(cfg, name="g")
    assert [s.value for s in specs if s.is_baseline] == [f"4{SEP}attention"]  # the other key at its first value
    assert from_dict(specs[0].cfg.to_dict()).ablation == cfg.ablation  # a run's config.json loads back


def _args(*argv: str):
    return build_parser().parse_args(list(argv))


def test_grid_flags_make_a_grid_on_the_defaults_or_widen_a_one_key_ablation():
    specs = resolve_runs(_args("--grid", "lora.rank=4,16", "--grid", "lora.target_modules=[q_proj,v_proj],attention"))
    assert len(specs) == 4 and {s.ablation for s in specs} == {"grid"}
    assert [s.value for s in specs] == [
        f"4{SEP}q_proj,v_proj",
        f"4{SEP}attention",
        f"16{SEP}q_proj,v_proj",
        f"16{SEP}attention",
    ]
    assert [s.is_baseline for s in specs] == [True, False, False, False]  # each key's first value
    rank_yaml = str(CONFIG_DIR / "abl_lora_rank.yaml")
    widened = resolve_runs(_args("--config", rank_yaml, "--grid", "target_modules=[q_proj,v_proj],attention"))
    assert len(widened) == 10 and widened[0].ablation == "lora_rank"
    assert [s.value for s in widened if s.is_baseline] == [f"16{SEP}q_proj,v_proj"]  # the ablation's own baseline
    # On the built-in grid, --grid replaces one key's values and keeps the other's.
    narrowed = resolve_runs(_args("--config", str(GRID_YAML), "--grid", "lora.rank=8", "--seeds", "2"))
    assert len(narrowed) == 6 and {s.cfg.lora.rank for s in narrowed} == {8}
    assert [s.value for s in narrowed if s.is_baseline] == [f"8{SEP}q_proj,v_proj"] * 2  # the YAML's, at rank 8
    kept = resolve_runs(_args("--config", str(GRID_YAML), "--grid", "lora.rank=4,16"))
    assert [s.value for s in kept if s.is_baseline] == [f"16{SEP}q_proj,v_proj"]  # the YAML's baseline is still there


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--grid", "lora.rank"], "expected KEY=V1,V2"),
        (["--grid", "lora.rank="], "expected KEY=V1,V2"),
        (["--grid", "lora.rnak=4,8", "--grid", "lora.alpha=1"], "Did you mean 'lora.rank'"),
        (["--grid", "lora.rank=4,8"], "two or more keys"),
        (["--config", str(GRID_YAML), "--lora_rank", "8"], "--grid lora.rank=V1,V2"),
        (["--config", str(GRID_YAML), "--set", "lora.target_modules=[q_proj]"], "a key this grid sweeps"),
        (["--config", str(CONFIG_DIR / "abl_lora_rank.yaml"), "--halving"], "halving needs a grid"),
    ],
)
def test_grid_flag_mistakes_are_one_line_errors_before_any_work(argv, needle, tmp_path, capsys):
    assert main([*argv, "--out", str(tmp_path / "out"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "out" / RESULTS_JSONL).exists()


def test_parse_grid_flag_reads_lists_in_brackets():
    assert parse_grid_flag("lora_rank=4,16") == ("lora.rank", [4, 16])
    assert parse_grid_flag("lora.target_modules=[q_proj,v_proj],all-linear") == (
        "lora.target_modules",
        [["q_proj", "v_proj"], "all-linear"],
    )


def test_grid_sweep_resumes_after_a_kill_with_nothing_run_twice(tmp_path):
    specs = plan_runs(load_config(GRID_YAML), name="x", seeds=2)
    killed = Fake(kill_at=7)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(specs, tmp_path, killed, say=quiet)
    assert len(read_rows(tmp_path)) == 6  # the six finished runs have their rows
    assert plan_states(specs, tmp_path)[:8] == ["done"] * 6 + ["resume", "run"]
    again = Fake()
    run_sweep(specs, tmp_path, again, say=quiet)
    assert [c[2] for c in again.calls] == [True] + [False] * 11  # the killed run resumes from its checkpoint
    finished = [c[0] for c in killed.calls[:6]] + [c[0] for c in again.calls]
    assert sorted(finished) == sorted(s.name for s in specs)  # every run finished exactly once
    assert plan_states(specs, tmp_path) == ["done"] * 18
    assert run_sweep(specs, tmp_path, Fake(), say=quiet) == []


def test_grid_rows_keep_the_one_key_columns_and_split_with_pandas(tmp_path):
    specs = plan_runs(load_config(GRID_YAML), name="x", seeds=1)
    run_sweep(specs, tmp_path, Fake(), say=quiet)
    df = pd.read_json(tmp_path / RESULTS_JSONL, lines=True)
    assert list(df.columns) == list(read_rows(tmp_path)[0])  # the same columns as a one-key ablation's rows
    parts = df["value"].str.split(SEP, expand=True)
    parts.columns = df["key"].iloc[0].split(SEP)
    assert parts["lora.rank"].astype(int).tolist() == df["lora_rank"].tolist()
    assert parts["lora.target_modules"].tolist() == df["target_modules"].tolist()
    assert df["is_baseline"].sum() == 1 and df["value_index"].tolist() == list(range(9))


def test_run_takes_the_budget_flags_and_refuses_halving_under_torchrun(tmp_path, capsys, monkeypatch):
    args = _args("--max-trainable-params", "5e4", "--max-train-time", "60", "--max-memory", "512")
    assert (args.max_trainable_params, args.max_train_time, args.max_memory) == (50_000, 60.0, 512.0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["--config", str(GRID_YAML), "--halving", "--out", str(tmp_path), "--dry-run"]) == 2
    assert "rung by rung in one process; under torchrun run the grid without it" in capsys.readouterr().err
