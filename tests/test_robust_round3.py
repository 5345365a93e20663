"""Bad input, round three: what a new user still hit on the newer surfaces (the lr grid, Ray, --data, --set, --out).
Each case fails with exit code 2 and one message naming the input the user gave, before any work: no tokenizer
trained, no text tokenized, no base pretrained, nothing written. In-process, each in about a second."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch

import experiments.base.pretrain
from experiments.run import main

CONFIGS = Path(__file__).resolve().parent.parent / "experiments" / "configs"
RANK = ["--config", str(CONFIGS / "abl_lora_rank.yaml"), "--lora_rank", "4"]


@pytest.fixture
def no_work(monkeypatch, isolated_cache) -> Path:
    """Any pretraining fails the test (not just the exit code): the checks must come first. Returns the cache,
    which must stay empty (no tokenizer, no token arrays, no base)."""

    def pretrain(*args, **kwargs) -> None:
        raise AssertionError("the base was built before the input was checked")

    monkeypatch.setattr(experiments.base.pretrain, "ensure_base", pretrain)
    monkeypatch.setattr(experiments.base.pretrain, "pretrain_base", pretrain)
    return isolated_cache


def refused(argv: list[str], out: Path, capsys, cache: Path) -> str:
    """Run the sweep; assert exit 2 with one line and no traceback, and that nothing was written anywhere."""
    rc = main([*argv, "--no-progress", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and not cache.exists(), err
    return err.strip()


# ----------------------------------------------------------------------------- text without usable text


def _empty(f: Path) -> str:
    f.write_bytes(b"")
    return "empty"


def _binary(f: Path) -> str:
    f.write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00" + bytes(range(256)))
    return "binary (NUL bytes)"


def _latin1(f: Path) -> str:
    f.write_bytes("caf\u00e9 cr\u00e8me br\u00fbl\u00e9e\nsecond line\n".encode("latin-1"))
    return "not UTF-8 (byte 3)"


def _jsonl_without_text(f: Path) -> str:
    f.write_text("".join(json.dumps({"body": f"line {i}"}) + "\n" for i in range(5)), encoding="utf-8")
    return "no field 'text' (found ['body']). Set data.text_field"


def _one_line(f: Path) -> str:
    f.write_text("x = 1  # the only line of the only document", encoding="utf-8")
    return "has a single line: nothing to hold out for validation"


UNUSABLE = [_empty, _binary, _latin1, _jsonl_without_text, _one_line]


@pytest.mark.parametrize("damage", UNUSABLE, ids=lambda d: d.__name__.strip("_"))
def test_data_without_usable_text_fails_before_any_work(tmp_path, capsys, no_work, damage):
    f = tmp_path / ("text.jsonl" if damage is _jsonl_without_text else "text.txt")
    needle = damage(f)
    err = refused([*RANK, "--data", str(f)], tmp_path / "out", capsys, no_work)
    assert err.startswith(f"config error: --data {f}: ") and needle in err


@pytest.mark.parametrize("damage", [_empty, _binary, _latin1, _jsonl_without_text], ids=lambda d: d.__name__.strip("_"))
def test_source_data_without_usable_text_fails_before_any_work(tmp_path, capsys, no_work, damage):
    f = tmp_path / ("text.jsonl" if damage is _jsonl_without_text else "text.txt")
    needle = damage(f)
    err = refused([*RANK, "--set", f"eval.source_data={f}"], tmp_path / "out", capsys, no_work)
    assert err.startswith(f"config error: --set eval.source_data={f}: ") and needle in err


def test_pretrain_corpus_without_usable_text_fails_before_any_work(tmp_path, capsys, no_work):
    needle = _latin1(tmp_path / "pt.txt")
    err = refused([*RANK, "--set", f"pretrain.corpus={tmp_path / 'pt.txt'}"], tmp_path / "out", capsys, no_work)
    assert err.startswith(f"config error: --set pretrain.corpus={tmp_path / 'pt.txt'}: ") and needle in err


def test_data_set_in_a_config_file_is_named_with_its_run(tmp_path, capsys, no_work):
    _empty(tmp_path / "empty.txt")
    cfg = tmp_path / "mine.yaml"
    cfg.write_text(f"data:\n  finetune: {tmp_path / 'empty.txt'}\n", encoding="utf-8")
    err = refused(["--config", str(cfg)], tmp_path / "out", capsys, no_work)
    assert err.startswith("config error: mine: 'data.finetune': ") and "no text found" in err


# ----------------------------------------------------------------------------- Ray address that does not answer


def _closed_port() -> int:
    """A port nothing listens on: bound by this process, then released."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("form", ["{}", "ray://{}", "RAY_ADDRESS={}"])
def test_ray_address_with_nothing_behind_it_fails_at_once(tmp_path, capsys, no_work, monkeypatch, form):
    address = f"127.0.0.1:{_closed_port()}"
    given = form.format(address)
    if given.startswith("RAY_ADDRESS="):
        monkeypatch.setenv("RAY_ADDRESS", address)
        argv, label = [], f"$RAY_ADDRESS={address}"
    else:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        argv, label = ["--ray-address", given], f"--ray-address {given}"
    err = refused([*RANK, "--executor", "ray", *argv], tmp_path / "out", capsys, no_work)
    assert err == (
        f"error: {label}: no Ray cluster answers at {address} (Connection refused). Start one there "
        "(ray start --head), or give the address `ray start` printed."
    )


def test_ray_address_that_is_no_address(tmp_path, capsys, no_work, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    err = refused([*RANK, "--executor", "ray", "--ray-address", "headnode"], tmp_path / "out", capsys, no_work)
    assert err.startswith("error: --ray-address headnode: not HOST:PORT")


# ----------------------------------------------------------------------------- --out and what the sweep writes there


@pytest.mark.parametrize("where", ["out", "plots", "runs"])
def test_out_or_its_plots_that_cannot_be_written(tmp_path, capsys, no_work, unwritable, where):
    out = tmp_path / "out"
    folder = unwritable(out if where == "out" else out / where)
    rc = main([*RANK, "--no-progress", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.strip().startswith(f"config error: --out {out}: cannot write in {folder} (")
    assert not no_work.exists() and not (out / "results.jsonl").exists()


@pytest.mark.parametrize("name", ["plots", "runs", "results.jsonl", "results.csv", "report.md"])
def test_a_file_where_a_folder_goes_or_a_folder_where_a_file_goes(tmp_path, capsys, no_work, name):
    out = tmp_path / "out"
    out.mkdir()
    if "." in name:
        (out / name).mkdir()
        what = "a folder where the sweep writes a file"
    else:
        (out / name).write_text("mine")
        what = "a file where the sweep writes a folder"
    rc = main([*RANK, "--no-progress", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err == f"config error: --out {out}: {out / name} is {what}; move it away.\n"
    assert sorted(p.name for p in out.iterdir()) == [name] and not no_work.exists()


# ----------------------------------------------------------------------------- empty values


@pytest.mark.parametrize(
    "flag", ["--lr-grid", "--data", "--base_model", "--out", "--config", "--ray-address"], ids=lambda f: f.strip("-")
)
@pytest.mark.parametrize("value", ["", " ", ","], ids=["empty", "blank", "comma"])
def test_an_empty_flag_value_is_an_error_not_a_default(tmp_path, capsys, no_work, flag, value):
    """`--lr-grid ""` used to run without a grid, `--out ""` in the current folder, `--data ""` on the built-in
    text: each silently something else than asked."""
    argv = [*RANK, "--executor", "ray"] if flag == "--ray-address" else RANK
    with pytest.raises(SystemExit) as e:
        main(
            [*argv, f"{flag}={value}", "--out", str(tmp_path / "out")] if flag != "--out" else [*argv, f"--out={value}"]
        )
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"error: argument {flag}" in err and f"{value!r} is empty; give a value" in err
    assert not (tmp_path / "out").exists() and not no_work.exists()


@pytest.mark.parametrize("setting", ["ablation.lr_grid=,", "lora.target_modules=,", "ablation.lr_grid= , "])
def test_a_list_set_to_nothing_is_an_error(tmp_path, capsys, no_work, setting):
    key, _, value = setting.partition("=")
    err = refused([*RANK, "--set", setting], tmp_path / "out", capsys, no_work)
    assert (
        err == f"config error: --set {setting}: '{key}' is empty: {value!r} lists nothing; give comma-separated values."
    )


# ----------------------------------------------------------------------------- an error names the input the user gave

GRID = ["--lr-grid", "1e-2,3e-2"]
QUICK = str(CONFIGS / "quick.yaml")


@pytest.mark.parametrize(
    "argv,blamed,rest",
    [
        (
            ["--lr-grid", "1e-2,0.01", "--quick"],
            "--lr-grid 1e-2,0.01: 'ablation.lr_grid'",
            "needs at least two distinct",
        ),
        (["--lr-grid", "1e-2", "--quick"], "--lr-grid 1e-2: 'ablation.lr_grid'", "needs at least two distinct"),
        (
            [*RANK, *GRID, "--set", "ablation.tune_fraction=0.9"],
            "--set ablation.tune_fraction=0.9, --lr-grid 1e-2,3e-2: 'ablation.tune_fraction'",
            "(0.9) + data.val_fraction (0.1) must stay below 1",
        ),
        (
            [*RANK, *GRID, "--quick", "--set", "data.val_fraction=0.95"],
            "--set data.val_fraction=0.95, --lr-grid 1e-2,3e-2: 'ablation.tune_fraction'",
            "(0.1) + data.val_fraction (0.95) must stay below 1",
        ),
        (
            [*RANK, "--quick", "--set", "train.micro_batch_tokens=256", "--set", "train.batch_tokens=256"],
            "--set train.batch_tokens=256: 'model.max_position_embeddings'",
            "(512) is longer than train.batch_tokens (256)",
        ),
        (
            ["--config", str(CONFIGS / "abl_context_length.yaml"), "--quick"]
            + ["--set", "train.micro_batch_tokens=1024", "--set", "train.batch_tokens=1024"],
            "ablation value 2048, --set train.batch_tokens=1024: 'model.max_position_embeddings'",
            "(2048) is longer than train.batch_tokens (1024)",
        ),
        (
            [*RANK, "--set", "pretrain.n_head=3"],
            "--set pretrain.n_head=3: 'pretrain.d_model'",
            "(128) must be divisible by pretrain.n_head (3)",
        ),
    ],
    ids=["lr-grid-twice", "lr-grid-one", "tune_fraction", "val_fraction", "batch_tokens", "batch-vs-value", "n_head"],
)
def test_a_rule_between_keys_blames_the_input_that_set_one(tmp_path, capsys, no_work, argv, blamed, rest):
    err = refused(argv, tmp_path / "out", capsys, no_work)
    assert err.startswith(f"config error: {blamed} ") and rest in err and QUICK not in err


def test_an_ablation_without_a_name_is_named_after_its_file(tmp_path, capsys, isolated_cache):
    """Its unset name used to fail every value's check ('ablation.name' must be a non-empty string)."""
    (tmp_path / "lr_study.yaml").write_text("ablation:\n  key: train.lr\n  values: [0.01, 0.02]\n", encoding="utf-8")
    assert main(["--config", str(tmp_path / "lr_study.yaml"), "--dry-run", "--out", str(tmp_path / "out")]) == 0
    plan = capsys.readouterr().out.splitlines()
    assert [line.split()[:3] for line in plan[1:3]] == [
        ["lr_study", "train.lr", "0.01"],
        ["lr_study", "train.lr", "0.02"],
    ]


def test_a_preflight_error_names_the_input_that_set_its_key(tmp_path, capsys, no_work):
    err = refused([*RANK, "--set", "lora.target_modules=[nope]"], tmp_path / "out", capsys, no_work)
    assert err.startswith("config error: --set lora.target_modules=[nope]: lora.target_modules on the built-in base")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_device_error_names_the_input_that_set_the_device(tmp_path, capsys, no_work):
    err = refused([*RANK, "--set", "train.device=cuda"], tmp_path / "out", capsys, no_work)
    assert err.startswith("config error: --set train.device=cuda: train.device is cuda, but torch")


def test_a_cache_that_cannot_be_written(tmp_path, capsys, monkeypatch, no_work):
    """Found before any work, named by its variable, not at the first token array as a bare FileNotFoundError."""
    (tmp_path / "a-file").write_text("mine")
    monkeypatch.setenv("SLM_LORA_CACHE", str(tmp_path / "a-file" / "cache"))
    err = refused(RANK, tmp_path / "out", capsys, no_work)
    assert err == (
        f"config error: $SLM_LORA_CACHE {tmp_path / 'a-file' / 'cache'}: {tmp_path / 'a-file'} is a file, so no "
        "folder can be made under it."
    )
