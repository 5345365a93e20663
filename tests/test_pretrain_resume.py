"""Pretraining the built-in base loses nothing: an interrupted build resumes to the weights of an uninterrupted one,
a second process waits for the first, and a diverged build is one clean message naming the learning rate."""

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from filelock import FileLock
from safetensors.torch import load_file

from data import load_corpus
from experiments import run
from experiments.base import pretrain
from training import loop


@pytest.fixture
def toy(tmp_path, toy_corpora, monkeypatch):
    toy_corpora(tmp_path)
    monkeypatch.setattr(pretrain, "CHECKPOINT_EVERY", 2)  # phase 2 of the tiny config has 4 steps
    return tmp_path


def steps_counted(monkeypatch) -> list[int]:
    """Records every optimizer step taken from now on (the loop sets the learning rate once per step)."""
    steps: list[int] = []
    real = loop.lr_at

    def counting(step, *args):
        steps.append(step)
        return real(step, *args)

    monkeypatch.setattr(loop, "lr_at", counting)
    return steps


@pytest.mark.parametrize("phase, step, rerun_steps", [("phase1", 8, 32 + 4), ("phase2", 2, 2)])
def test_interrupted_pretraining_resumes_to_the_same_weights(toy, monkeypatch, tiny_config, phase, step, rerun_steps):
    cfg = tiny_config(toy)
    monkeypatch.setenv("SLM_LORA_CACHE", str(toy / "straight"))
    straight = pretrain.ensure_base(cfg, progress=False)

    monkeypatch.setenv("SLM_LORA_CACHE", str(toy / "interrupted"))
    real_save = loop.save_checkpoint

    def save_then_die(path, *args, **kwargs):
        real_save(path, *args, **kwargs)
        if path.parent.name == phase and args[3]["step"] == step:
            raise KeyboardInterrupt  # Ctrl-C right after this checkpoint

    with monkeypatch.context() as mp:
        mp.setattr(loop, "save_checkpoint", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            pretrain.ensure_base(cfg, progress=False)
    partial = next((toy / "interrupted" / "base").glob("*.partial"))
    assert (partial / phase / "checkpoint.pt").is_file()

    with monkeypatch.context() as mp:
        taken = steps_counted(mp)
        resumed = pretrain.ensure_base(cfg, progress=False)
    assert len(taken) == rerun_steps  # it went on from the checkpoint (and a finished phase 1 is not redone)
    assert not partial.exists() and resumed.name == straight.name
    a, b = (load_file(str(d / "model.safetensors")) for d in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_process_waits_for_the_first(toy, isolated_cache, tiny_config, capsys):
    cfg = tiny_config(toy)
    folder = isolated_cache / "base" / pretrain.base_key(cfg, load_corpus(cfg.pretrain.corpus).fingerprint)
    folder.parent.mkdir(parents=True)
    other = FileLock(f"{folder}.lock")  # as another process building the same base holds it
    other.acquire()
    with ThreadPoolExecutor(1) as pool:
        built = pool.submit(pretrain.ensure_base, cfg, progress=False)
        try:
            err, deadline = "", time.monotonic() + 300
            while "waiting for another process" not in err and time.monotonic() < deadline:
                time.sleep(0.05)
                err += capsys.readouterr().err
            assert "waiting for another process" in err  # it found the lock taken and said so
            assert not built.done() and not folder.exists()  # waiting, not training the same base twice
        finally:
            other.release()
        assert built.result(timeout=600) == folder and (folder / "model.safetensors").is_file()


@pytest.mark.parametrize("key", ["pretrain.lr", "pretrain.long_lr"])
def test_diverged_pretraining_is_one_clean_message(toy, isolated_cache, capsys, key):
    argv = ["--config", "experiments/configs/abl_lora_rank.yaml", "--lora_rank", "4", "--quick", "--no-progress"]
    argv += ["--out", str(toy / "out"), "--data", str(toy / "ft"), "--set", f"pretrain.corpus={toy / 'pt'}"]
    argv += ["--set", f"{key}=1e12"]
    assert run.main(argv) == 2
    err = capsys.readouterr().err
    assert "pretraining the built-in base diverged" in err and f"lower {key} (now 1e+12)" in err, err
    assert "Traceback" not in err
    assert not list((isolated_cache / "base").glob("*.partial"))  # nothing left to resume into the same divergence
    assert not (toy / "out" / "results.jsonl").exists()
