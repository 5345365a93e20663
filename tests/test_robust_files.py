"""Nothing is lost or doubled on disk: concurrent appends, file modes, damaged and diverged checkpoints, broken
results files, a full disk (README, "Nothing is lost"). Concurrency runs in real processes."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from proc_helpers import release_together
from row_helpers import a_row

from data.cache import atomic_write, write_json_atomic
from experiments import run
from experiments.report import markdown as report
from experiments.sweep import results
from experiments.sweep.results import RESULTS_CSV, RESULTS_JSONL, read_rows
from lora import LoRAConfig, inject_lora
from training import loop
from training.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from training.distributed import DistInfo

REPO = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
ONE = DistInfo(rank=0, world_size=1, device=CPU, owns_group=False)
RANK = str(REPO / "experiments/configs/abl_lora_rank.yaml")

APPENDER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from experiments.sweep.results import append_row
    out, me = Path(sys.argv[1]), sys.argv[2]
    open(out / f"go-{me}").read()  # a FIFO: both writers start appending at the same moment (release_together)
    for i in range(150):
        append_row(out, {"ablation": "w" + me, "key": "k", "value": i, "seed": 0, "status": "ok",
                         "config_hash": f"{me}-{i}", "study_hash": "s"})
""")


def test_concurrent_appends_keep_every_row(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for me in ("a", "b"):
        os.mkfifo(tmp_path / f"go-{me}")
    named = {
        me: subprocess.Popen([sys.executable, "-c", APPENDER, str(tmp_path), me], env=env, stderr=subprocess.PIPE)
        for me in ("a", "b")
    }
    procs = list(named.values())
    try:
        release_together(tmp_path, named)
        for p in procs:
            assert p.wait(timeout=600) == 0, p.stderr.read().decode()[-2000:]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    rows = read_rows(tmp_path)
    assert len(rows) == 300 and len({r["config_hash"] for r in rows}) == 300
    for me in ("a", "b"):  # each writer's rows in its own order
        assert [r["value"] for r in rows if r["ablation"] == "w" + me] == list(range(150))
    assert (tmp_path / RESULTS_CSV).read_text().count("\n") == 301


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_files_respect_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "a.bin", lambda f: f.write(b"x"))
        write_json_atomic(tmp_path / "b.json", {"x": 1})
        results.append_row(tmp_path / "out", a_row())
    finally:
        os.umask(old)
    for f in (
        tmp_path / "a.bin",
        tmp_path / "b.json",
        tmp_path / "out" / RESULTS_JSONL,
        tmp_path / "out" / RESULTS_CSV,
    ):
        assert f.stat().st_mode & 0o777 == mode, (f.name, oct(f.stat().st_mode))


# ----------------------------------------------------------------------------- checkpoints


def _lora_gpt(tiny_gpt):
    model = tiny_gpt()
    inject_lora(model, LoRAConfig(rank=4, alpha=8.0, target_modules=["q_proj", "v_proj"]))
    return model.train()


def _batches(step: int, micro: int):
    g = torch.Generator().manual_seed(1000 * step + micro)
    w = torch.randint(0, 97, (4, 17), generator=g)
    return w[:, :-1], w[:, 1:]


def test_damaged_checkpoint_is_set_aside_and_the_run_starts_fresh(tmp_path, tiny_gpt, capsys):
    plan, settings = loop.BatchPlan(16, 4, 1, steps=4), loop.Settings(lr=1e-2)
    fresh = loop.train(_lora_gpt(tiny_gpt), _batches, plan, settings, device=CPU, dist=ONE, progress=False)

    model = _lora_gpt(tiny_gpt)
    ckpt = tmp_path / CHECKPOINT_FILE
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    save_checkpoint(ckpt, model, opt, None, {"step": 2})
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])  # a copy cut short
    out = loop.train(
        model, _batches, plan, settings, device=CPU, dist=ONE, checkpoint=ckpt, resume=True, progress=False
    )
    assert out.status == "ok" and out.train_curve == fresh.train_curve  # from step 0, as if never interrupted
    aside = list(tmp_path.glob(f"{CHECKPOINT_FILE}.damaged-*"))
    assert len(aside) == 1 and not ckpt.exists()
    err = capsys.readouterr().err
    assert str(ckpt) in err and aside[0].name in err and "starting this run from step 0" in err


@pytest.mark.parametrize(
    "other, needle",
    [
        (LoRAConfig(rank=4, alpha=8.0, target_modules=["k_proj"]), "missing ['layers.0.self_attn.k_proj.lora_A'"),
        (LoRAConfig(rank=8, alpha=8.0, target_modules=["q_proj", "v_proj"]), "lora_A: (4, 32) in the file, (8, 32)"),
    ],
    ids=["other-modules", "other-rank"],
)
def test_checkpoint_of_another_config_is_refused_before_anything_changes(tmp_path, tiny_gpt, other, needle):
    ckpt = tmp_path / CHECKPOINT_FILE
    model = _lora_gpt(tiny_gpt)
    save_checkpoint(ckpt, model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]), None, {})
    theirs = tiny_gpt()
    inject_lora(theirs, other)
    before = {n: p.clone() for n, p in theirs.named_parameters()}
    opt = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad])
    with pytest.raises(ValueError, match="written by a different config") as e:
        load_checkpoint(ckpt, theirs, opt, None)
    assert str(ckpt) in str(e.value) and needle in str(e.value) and "Delete it or drop --resume" in str(e.value)
    assert all(torch.equal(p, before[n]) for n, p in theirs.named_parameters())


def test_diverged_run_leaves_no_checkpoint(tmp_path, tiny_gpt):
    model = _lora_gpt(tiny_gpt)
    real_loss, calls = model.loss, {"n": 0}

    def poisoned(x, y):  # step 3's loss is NaN (+1 call: the memory-measuring pass)
        calls["n"] += 1
        return real_loss(x, y) * (float("nan") if calls["n"] == 1 + 3 else 1.0)

    model.loss = poisoned
    ckpt = tmp_path / CHECKPOINT_FILE
    out = loop.train(
        model,
        _batches,
        loop.BatchPlan(16, 4, 1, steps=6),
        loop.Settings(lr=1e-2, checkpoint_every=1),
        device=CPU,
        dist=ONE,
        checkpoint=ckpt,
        progress=False,
    )
    assert out.status == "diverged" and out.diverged_step == 3
    assert not ckpt.exists()  # steps 1 and 2 wrote one; a retry must not resume on the way to divergence


# ----------------------------------------------------------------------------- results files


@pytest.mark.parametrize(
    "line,why",
    [('{"ablation": "lora_rank", "status": "ok", "conf', "is not JSON"), ('{"hello": 1}', "is not a result row")],
    ids=["broken", "foreign"],
)
def test_broken_or_foreign_results_line_is_named_and_left_as_is(tmp_path, capsys, isolated_cache, line, why):
    out = tmp_path / "out"
    out.mkdir()
    good = {"ablation": "a", "key": "k", "value": 1, "seed": 0, "status": "ok", "config_hash": "h", "study_hash": "s"}
    (out / RESULTS_JSONL).write_text(json.dumps(good) + "\n" + line + "\n")
    before = (out / RESULTS_JSONL).read_bytes()
    for command in (
        lambda: run.main(["--config", RANK, "--out", str(out), "--dry-run"]),
        lambda: run.main(["--config", RANK, "--lora_rank", "4", "--out", str(out)]),
        lambda: report.main([str(out)]),
    ):
        rc = command()
        err = capsys.readouterr().err
        assert rc == 2 and "Traceback" not in err
        assert f"{out / RESULTS_JSONL}, line 2 {why}" in err and "left as it is" in err and "delete or fix" in err
    assert (out / RESULTS_JSONL).read_bytes() == before
    assert not (out / "runs").exists() and not (isolated_cache / "base").exists()  # nothing started


# ----------------------------------------------------------------------------- a full disk


def _ok(spec) -> dict:
    return {"status": "ok", "val_loss": 2.0, "val_ppl": 7.4, "train_tokens": 8, "steps": 1, "device": "cpu (fake)"}


@pytest.fixture
def fake_sweep(monkeypatch):
    """run.main with a fake training process: no base, no tokens; `calls` lists the runs it trained."""
    calls: list[str] = []
    monkeypatch.setattr(run, "_prepare", lambda *a: None)
    monkeypatch.setattr(report, "write_report", lambda *a, **k: "")

    def runner(**kw):
        def train(spec, run_dir, resume):
            calls.append(spec.name)
            return _ok(spec)

        return train

    monkeypatch.setattr(run, "subprocess_runner", runner)
    return calls


def test_full_disk_while_recording_a_row_stops_and_keeps_the_result(tmp_path, monkeypatch, capsys, fake_sweep):
    out = tmp_path / "out"
    argv = ["--config", RANK, "--set", "ablation.values=[4, 8]", "--set", "ablation.baseline=4", "--out", str(out)]
    real = results.atomic_write

    def full(path, write):
        if path.name == RESULTS_JSONL:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, write)

    monkeypatch.setattr(results, "atomic_write", full)
    assert run.main(argv) == 1
    err = capsys.readouterr().err
    assert "stopped: no space left on device" in err and "Traceback" not in err and "run the same command" in err
    assert len(fake_sweep) == 1  # stopped after the first run: the second would fail the same way
    kept = list(out.glob("runs/*/result.json"))
    assert len(kept) == 1 and json.loads(kept[0].read_text())["status"] == "ok"
    assert not (out / RESULTS_JSONL).exists() and not list(out.rglob("*.tmp"))

    monkeypatch.setattr(results, "atomic_write", real)  # space freed: the same command records and goes on
    assert run.main(argv) == 0
    rows = read_rows(out)
    assert [r["value"] for r in rows] == [4, 8] and rows[0]["reused_from"] == str(kept[0].parent.relative_to(out))
    assert len(fake_sweep) == 2


def test_full_disk_in_a_training_process_stops_the_sweep(tmp_path, monkeypatch, capsys, fake_sweep):
    def runner(**kw):
        def train(spec, run_dir, resume):
            fake_sweep.append(spec.name)
            return {"status": "failed", "error": "OSError: [Errno 28] No space left on device"}

        return train

    monkeypatch.setattr(run, "subprocess_runner", runner)
    out = tmp_path / "out"
    argv = ["--config", RANK, "--set", "ablation.values=[4, 8]", "--set", "ablation.baseline=4", "--out", str(out)]
    assert run.main(argv) == 1
    assert "stopped: no space left on device" in capsys.readouterr().err
    assert len(fake_sweep) == 1 and [r["status"] for r in read_rows(out)] == ["failed"]  # recorded, then stopped
