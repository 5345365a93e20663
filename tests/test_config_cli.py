"""Every config mistake fails fast — before any data or model work — naming the file or flag, the key and what is
allowed; and --dry-run shows the resolved runs. All in-process: nothing here trains."""

from __future__ import annotations

import textwrap

import pytest

from experiments.run import DEFAULT_STUDY, main


def run(argv, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main([*argv, "--out", str(out)])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err, out


def write(tmp_path, text, name="abl.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


@pytest.mark.parametrize(
    "argv,needles",
    [
        (["--lora_rank", "0"], ["--lora_rank 0", "'lora.rank'", "[1, 4096]", "got 0"]),
        (["--lora_rank", "abc"], ["--lora_rank abc", "must be an integer"]),
        (["--lora_rank", "2.5"], ["must be an integer", "2.5"]),
        (["--max_position_embeddings", "4"], ["'model.max_position_embeddings' must be in [8"]),
        (["--target_modules", ""], ["'lora.target_modules' must be a list"]),
        (["--target_modules", ","], ["--target_modules ,: 'lora.target_modules' is empty: ',' lists nothing"]),
        (["--set", "train.lrr=1e-3"], ["--set train.lrr=1e-3", "Did you mean 'train.lr'?"]),
        (["--set", "lora_rnk=8"], ["Did you mean 'lora_rank'?"]),
        (["--set", "train.lr"], ["expected KEY=VALUE"]),
        (["--set", "train.lr=-1"], ["'train.lr' must be in (0, inf)"]),
        (["--set", "lora.alpha_policy=double"], ["must be one of ['fixed', 'double_rank', 'rslora']"]),
        (["--set", "train.compile=yes please"], ["'train.compile' must be true or false"]),
        (["--set", "train.micro_batch_tokens=99999"], ["must not exceed train.batch_tokens"]),
        (["--set", "train"], ["expected KEY=VALUE"]),
        (["--set", "train=3"], ["is a section"]),
        (["--seeds", "0"], ["--seeds 0", "at least 1"]),
        (["--data", "/no/such/corpus.txt"], ["--data /no/such/corpus.txt", "no such file"]),
        (["--base_model", "/no/such/opt"], ["--base_model /no/such/opt", "no such folder, nor a Hugging Face model"]),
        (["--data", "/no/such/*.txt"], ["--data /no/such/*.txt", "glob matches nothing"]),
        (["--set", "data.finetune=/no/such/dir"], ["'data.finetune': '/no/such/dir' is no file, folder"]),
        (["--set", "pretrain.corpus=/no/such/dir"], ["'pretrain.corpus'", "Give 'builtin'"]),
        (["--config", "/no/such.yaml"], ["/no/such.yaml", "no such config file", "configs"]),
    ],
)
def test_cli_errors_fail_fast(argv, needles, tmp_path, capsys):
    rc, out, err, out_dir = run(argv, tmp_path, capsys)
    assert rc == 2, (out, err)
    for n in needles:
        assert n in err, (n, err)
    assert not out_dir.exists()  # nothing was started


@pytest.mark.parametrize(
    "yaml_text,needles",
    [
        ("lora:\n  rnak: 8\n", ["abl.yaml", "'lora.rnak' is not a config key", "Did you mean 'lora.rank'?"]),
        ("trian:\n  lr: 1\n", ["abl.yaml", "Did you mean 'train'?"]),
        ("train:\n  lr: fast\n", ["abl.yaml", "'train.lr' must be a number, got 'fast'"]),
        ("train:\n  tokens: 1.5\n", ["'train.tokens' must be an integer"]),
        ("lora:\n  dropout: 1.0\n", ["'lora.dropout' must be in [0, 1)"]),
        ("lora:\n  target_modules: []\n", ["'lora.target_modules' is empty"]),
        (
            "ablation:\n  name: r\n  key: lora_rank\n  values: [4, 0]\n",
            ["abl.yaml (ablation value 0)", "'lora.rank' must be in [1, 4096]"],
        ),
        ("ablation:\n  name: r\n  key: lora_rnk\n  values: [4]\n", ["Did you mean 'lora_rank'?"]),
        (
            "ablation:\n  name: r\n  key: lora_rank\n  values: [4, 8]\n  baseline: 16\n",
            ["'ablation.baseline' 16 is not one of the ablation values [4, 8]"],
        ),
        ("ablation:\n  name: r\n  key: lora_rank\n", ["needs a 'key' and a non-empty 'values' list"]),
        ("- just\n- a list\n", ["top level must be a mapping"]),
        ("lora: [1, 2\n", ["not valid YAML"]),
    ],
)
def test_config_file_errors_name_file_and_key(yaml_text, needles, tmp_path, capsys):
    path = write(tmp_path, yaml_text)
    rc, out, err, out_dir = run(["--config", str(path)], tmp_path, capsys)
    assert rc == 2, (out, err)
    for n in needles:
        assert n in err, (n, err)
    assert not out_dir.exists()


def test_dry_run_lists_default_study(tmp_path, capsys):
    rc, out, err, out_dir = run(["--dry-run", "--seeds", "2"], tmp_path, capsys)
    assert rc == 0
    lines = [ln for ln in out.splitlines() if ln.startswith(("lora_rank ", "target_modules ", "context_length "))]
    assert len(lines) == 26  # (5 + 4 + 4) values x 2 seeds
    ablation, key, value, lr, seed, config_hash, state, run_dir = lines[0].split()
    assert (ablation, key, value, lr, seed, state) == ("lora_rank", "lora.rank", "4", "0.01", "0", "run")
    assert len(config_hash) == 16 and run_dir.endswith(f"runs/{config_hash}")
    assert sum(" reuse " in ln for ln in lines) == 4  # the shared baseline, at both seeds
    assert "26 runs: 0 done, 26 to run" in out
    assert not out_dir.exists()


def test_value_flags_select_one_value_any_valid(tmp_path, capsys):
    rc, out, _, _ = run(["--dry-run", "--lora_rank", "12"], tmp_path, capsys)
    assert rc == 0 and "lora_rank  lora.rank  12" in out and "1 runs:" in out
    rc, out, _, _ = run(["--dry-run", "--target-modules", "q_proj,fc2"], tmp_path, capsys)
    assert rc == 0 and "q_proj,fc2" in out and "1 runs:" in out
    # A value flag for another ablation's key sets that key; --set of the swept key selects the value.
    cfg = str(DEFAULT_STUDY[2])
    rc, out, _, _ = run(
        [
            "--dry-run",
            "--config",
            cfg,
            "--lora_rank",
            "8",
            "--set",
            "model.max_position_embeddings=1024",
            "--set",
            "train.lr=3e-4",
            "--set",
            "train.batch_tokens=4096",
            "--set",
            "train.micro_batch_tokens=2048",
        ],
        tmp_path,
        capsys,
    )
    assert rc == 0 and "context_length  model.max_position_embeddings  1024" in out and "1 runs:" in out


def test_several_configs_at_once_and_a_context_chosen_by_flag(tmp_path, capsys):
    rank, _, context = map(str, DEFAULT_STUDY)
    rc, out, _, _ = run(["--dry-run", "--config", rank, "--config", context], tmp_path, capsys)
    lines = [ln.split()[:3] for ln in out.splitlines() if ln.startswith(("lora_rank ", "context_length "))]
    assert rc == 0 and "9 runs:" in out and {a for a, _, _ in lines} == {"lora_rank", "context_length"}
    assert [v for a, _, v in lines if a == "context_length"] == ["256", "512", "1024", "2048"]
    rc, out, _, _ = run(["--dry-run", "--config", context, "--max_position_embeddings", "1536"], tmp_path, capsys)
    assert rc == 0 and "context_length  model.max_position_embeddings  1536" in out and "1 runs:" in out


def test_quick_overrides_apply_to_every_run(tmp_path, capsys):
    from experiments.run import build_parser, resolve_runs

    specs = resolve_runs(build_parser().parse_args(["--quick", "--set", "train.tokens=4096"]))
    assert len(specs) == 13
    assert {s.cfg.train.tokens for s in specs} == {4096}  # --set comes after quick.yaml
    assert {s.cfg.pretrain.n_layer for s in specs} == {2}  # the tiny base of quick.yaml
    assert {s.cfg.eval.max_tokens for s in specs} == {4096}
    full = resolve_runs(build_parser().parse_args([]))
    assert {s.config_hash for s in specs}.isdisjoint({s.config_hash for s in full})


def test_with_values_checks_each_then_cross_field_once():
    from experiments.config.config import ConfigError, load_config, with_values

    cfg = load_config(DEFAULT_STUDY[0])
    # Lowering batch below the current micro-batch is fine when the micro-batch comes down in the same call.
    for items in (
        [("train.batch_tokens", 2048, "a"), ("train.micro_batch_tokens", 1024, "b")],
        [("train.micro_batch_tokens", 1024, "b"), ("train.batch_tokens", 2048, "a")],
    ):
        new = with_values(cfg, items)
        assert (new.train.batch_tokens, new.train.micro_batch_tokens) == (2048, 1024)
    # YAML 1.1 reads 3e5 / 3e-4 as strings: they are numbers, and hash like the numbers they are.
    a = with_values(cfg, [("train.tokens", "3e5", "--set"), ("train.lr", "3e-4", "--set")])
    b = with_values(cfg, [("train.tokens", 300000, "--set"), ("train.lr", 0.0003, "--set")])
    assert a.train.tokens == 300000 and isinstance(a.train.tokens, int) and a.hash() == b.hash()
    with pytest.raises(ConfigError, match=r"^--flag: 'lora.rank' must be in \[1, 4096\], got 0\.$"):
        with_values(cfg, [("train.lr", 1e-3, "--set"), ("lora_rank", 0, "--flag")])
    with pytest.raises(ConfigError, match=r"ablation value 5000\)"):  # every ablation value is checked again
        with_values(cfg, [("ablation.values", [4, 5000], "--set"), ("ablation.baseline", 4, "--set")])


def test_settings_file_applies_to_every_ablation_and_never_selects_a_value(tmp_path):
    from experiments.run import build_parser, resolve_runs

    settings = write(
        tmp_path,
        """\
        train: {tokens: 24576, lr: 0.003}
        lora: {rank: 8}
        eval: {source_data: builtin}
        """,
        "study.yaml",
    )
    specs = resolve_runs(build_parser().parse_args(["--settings", str(settings), "--set", "train.lr=1e-3"]))
    assert len(specs) == 13  # every value of the three ablations: lora.rank: 8 selects nothing in the rank study
    assert {s.cfg.train.tokens for s in specs} == {24576}
    assert {s.cfg.train.lr for s in specs} == {1e-3}  # --set comes after the settings file
    assert {s.cfg.eval.source_data for s in specs} == {"builtin"}
    assert sorted(s.cfg.lora.rank for s in specs if s.ablation == "lora_rank") == [4, 8, 16, 32, 64]
    assert {s.cfg.lora.rank for s in specs if s.ablation != "lora_rank"} == {8}


@pytest.mark.parametrize(
    "text,needles",
    [
        ("ablation: {values: [4, 8]}\n", ["--settings", "sets ablation.values", "--config"]),
        ("ablation: {grid: {lora.rank: [4, 8]}}\n", ["sets ablation.grid.lora.rank", "make an ablation"]),
        ("- 1\n- 2\n", ["expected a mapping of config sections"]),
        ("train: {lrr: 0.1}\n", ["--settings", "Did you mean 'train.lr'?"]),
    ],
)
def test_settings_file_errors(text, needles, tmp_path, capsys):
    settings = write(tmp_path, text, "study.yaml")
    rc, _, err, out_dir = run(["--dry-run", "--settings", str(settings)], tmp_path, capsys)
    assert rc == 2
    for n in needles:
        assert n in err, (n, err)
    assert not out_dir.exists()
