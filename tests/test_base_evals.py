"""The base model's "before" losses (validation and source set) are evaluated once per study and read back by the
other runs: the cached figure is the one a run computes itself, and anything it depends on changes the key."""

import os
import shutil

import pytest

from experiments.base import evals as base_evals
from experiments.base.pretrain import ensure_base
from experiments.finetune.train import train_run
from training import loop

BEFORE = ("base_val_loss", "base_source_val_ppl")


@pytest.fixture(scope="module")
def toy(tmp_path_factory, toy_corpora, tiny_config, run_workspace):
    """Toy corpora and the toy base, pretrained before any test counts evaluations."""
    root = tmp_path_factory.mktemp("base_evals")
    toy_corpora(root)
    with run_workspace(root):
        ensure_base(tiny_config(root), progress=False)
        yield root


def counting_evaluate(monkeypatch) -> list[int]:
    """Patch loop.evaluate to count its calls (by number of windows) and still compute."""
    calls: list[int] = []
    real = loop.evaluate

    def spy(model, xv, yv, *a, **k):
        calls.append(xv.shape[0])
        return real(model, xv, yv, *a, **k)

    monkeypatch.setattr(loop, "evaluate", spy)
    return calls


def test_second_run_reads_the_before_figures_and_they_equal_a_fresh_evaluation(toy, tiny_config, monkeypatch):
    calls = counting_evaluate(monkeypatch)
    first = train_run(tiny_config(toy, lora={"rank": 4}), toy / "runs" / "r4", progress=False)
    assert first["status"] == "ok" and len(calls) == 4  # before: val, source; after: val, source
    second = train_run(tiny_config(toy, lora={"rank": 8}), toy / "runs" / "r8", progress=False)
    assert second["status"] == "ok" and len(calls) == 6  # only the two "after" evaluations
    assert all(second[k] == first[k] for k in BEFORE)  # the same base on the same tokens
    assert second["val_loss"] != first["val_loss"]

    shutil.rmtree(toy / "cache" / base_evals.BASE_EVALS)  # nothing cached: the run computes them itself
    fresh = train_run(tiny_config(toy, lora={"rank": 8}), toy / "runs" / "r8-fresh", progress=False)
    assert len(calls) == 10 and all(fresh[k] == first[k] for k in BEFORE)
    assert fresh["val_loss"] == second["val_loss"]  # the cache changes nothing but the time taken


def test_another_context_or_rewritten_weights_are_evaluated_again(toy, tiny_config, monkeypatch):
    cfg = tiny_config(toy)
    train_run(cfg, toy / "runs" / "ctx32", progress=False)
    calls = counting_evaluate(monkeypatch)
    train_run(tiny_config(toy, model={"max_position_embeddings": 16}), toy / "runs" / "ctx16", progress=False)
    assert len(calls) == 4  # other windows: a key of their own

    base = ensure_base(cfg, progress=False)
    weights = next(base.glob("*.safetensors"))
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # a checkpoint overwritten in place, same size
    train_run(tiny_config(toy, lora={"rank": 2}), toy / "runs" / "rewritten", progress=False)
    assert len(calls) == 8


def test_an_unreadable_entry_is_recomputed_and_replaced(toy):
    path = base_evals.cache_dir(base_evals.BASE_EVALS) / "k.json"
    path.write_text("{not json")
    assert base_evals.cached_base_loss("k", lambda: 1.25) == 1.25
    assert base_evals.cached_base_loss("k", lambda: pytest.fail("read back, not recomputed")) == 1.25
