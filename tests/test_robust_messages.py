"""Ordinary mistakes get one clean message (no traceback), and exit codes scripts can rely on (README, "Exit codes")."""

from __future__ import annotations

from pathlib import Path

import pytest

from experiments import run
from experiments.config.yamlfile import load_yaml
from experiments.finetune import train as finetune
from experiments.report import markdown as report
from experiments.sweep.results import read_rows

RANK = str(Path(__file__).resolve().parent.parent / "experiments" / "configs" / "abl_lora_rank.yaml")


def config_error(tmp_path: Path, capsys, content: bytes) -> str:
    path = tmp_path / "abl.yaml"
    path.write_bytes(content)
    rc = run.main(["--config", str(path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and str(path) in err, err
    assert not (tmp_path / "out").exists()
    return err


def test_non_utf8_config(tmp_path, capsys):
    err = config_error(tmp_path, capsys, "train:\n  lr: 0.01  # café\n".encode("latin-1"))
    assert "not UTF-8 text (byte 0xe9 on line 2). Save the file as UTF-8." in err


@pytest.mark.parametrize(
    "text,key,lines",
    [
        ("train:\n  lr: 0.01\n  seed: 1\n  lr: 0.02\n", "'lr'", "lines 2 and 4"),
        ("lora:\n  rank: 4\nlora:\n  rank: 8\n", "'lora'", "lines 1 and 3"),
    ],
    ids=["nested", "top-level"],
)
def test_yaml_duplicate_key(tmp_path, capsys, text, key, lines):
    err = config_error(tmp_path, capsys, text.encode())
    assert f"key {key} appears twice in one mapping ({lines}); YAML would silently keep the last one" in err


def test_yaml_merge_keys_may_still_override():
    text = "a: &x {k: 1, j: 2}\nb:\n  <<: *x\n  k: 3\n"
    assert load_yaml(text, "test") == {"a": {"k": 1, "j": 2}, "b": {"k": 3, "j": 2}}


@pytest.mark.parametrize("content", [b"", b"# only a comment\n"], ids=["empty", "comments"])
def test_empty_yaml(tmp_path, capsys, content):
    err = config_error(tmp_path, capsys, content)
    assert "is empty (or only comments)" in err and "'ablation:' block" in err and "write {} in it" in err


@pytest.mark.parametrize(
    "content,needle",
    [
        (None, "no such file"),
        ('{"train": ', "cannot be read as JSON"),
        ('{"train": {"lrr": 1}}', "Did you mean 'train.lr'?"),
    ],
    ids=["missing", "not-json", "invalid"],
)
def test_finetune_cli_with_a_missing_or_invalid_config(tmp_path, capsys, content, needle):
    path = tmp_path / "config.json"
    if content is not None:
        path.write_text(content)
    rc = finetune.main(["--config-json", str(path), "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("config error: ") and needle in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def _sweep(monkeypatch, statuses: dict[int, str]):
    """run.main over ranks 4, 8, 16 with a fake training process that ends each rank with statuses.get(rank, ok)."""
    trained: list[int] = []
    monkeypatch.setattr(run, "_prepare", lambda *a: None)
    monkeypatch.setattr(report, "write_report", lambda *a, **k: "")

    def runner(**kw):
        def train(spec, run_dir, resume):
            trained.append(spec.cfg.lora.rank)
            status = statuses.get(spec.cfg.lora.rank, "ok")
            return {"status": status, "error": None if status == "ok" else f"{status} on purpose", "val_ppl": 7.0}

        return train

    monkeypatch.setattr(run, "subprocess_runner", runner)
    return trained


@pytest.mark.parametrize("status", ["failed", "diverged", "oom"])
def test_a_run_that_did_not_end_ok_exits_1_after_the_others(tmp_path, monkeypatch, capsys, status):
    trained = _sweep(monkeypatch, {8: status})
    argv = ["--config", RANK, "--set", "ablation.values=[4, 8, 16]", "--set", "ablation.baseline=4"]
    assert run.main([*argv, "--out", str(tmp_path)]) == 1
    assert trained == [4, 8, 16]  # the others still ran
    assert [r["status"] for r in read_rows(tmp_path)] == ["ok", status, "ok"]
    assert f"1 run(s) did not end ok (1 {status})" in capsys.readouterr().err


def test_all_runs_ok_exit_0(tmp_path, monkeypatch):
    trained = _sweep(monkeypatch, {})
    argv = ["--config", RANK, "--set", "ablation.values=[4, 8]", "--set", "ablation.baseline=4"]
    assert run.main([*argv, "--out", str(tmp_path)]) == 0 and trained == [4, 8]
    assert run.main([*argv, "--out", str(tmp_path)]) == 0 and trained == [4, 8]  # all done already: still 0
