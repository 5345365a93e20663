"""Forgetting: every run evaluates a source set before and after fine-tuning. For the built-in base it is the held-out
pretraining documents (never trained on); for a user's base, eval.source_data; without one the columns stay empty."""

import math
import shutil

import numpy as np
import pytest
import torch

from data import Corpus, load_corpus, load_tokenizer
from data import corpus as data_corpus
from experiments import run
from experiments.base import pretrain
from experiments.base.pretrain import SOURCE_VAL_FILE, ensure_base, pretrain_split
from experiments.config.config import ConfigError
from experiments.finetune.train import finetune_tokens, train_run
from experiments.sweep.results import make_row, to_csv
from training import loop

SOURCE_COLUMNS = ("source_val_loss", "source_val_ppl", "base_source_val_ppl", "forgetting")


@pytest.fixture(scope="module")
def toy(tmp_path_factory, toy_corpora, run_workspace):
    """Toy corpora plus two planted pretraining documents, one on each side of the held-out split; one cache for the
    module, so the toy base is pretrained once."""
    root = tmp_path_factory.mktemp("source_eval")
    toy_corpora(root)
    names = [f"planted_{i}.py" for i in range(200)]
    train_side, held_out = pretrain_split(Corpus("probe", [(n, "x") for n in names], "probe"))
    (root / "pt" / train_side.docs[0][0]).write_text("trained_marker_qzx = 1\n" * 30, encoding="utf-8")
    (root / "pt" / held_out.docs[0][0]).write_text("heldout_marker_qzx = 1\n" * 30, encoding="utf-8")
    with run_workspace(root):
        yield root


def test_source_set_is_held_out_pretraining_documents_only(toy, tiny_config, monkeypatch):
    tokenized: dict[str, Corpus] = {}
    real = pretrain.token_array

    def spy(corpus, tok, desc="tokenize", progress=True):
        tokenized[desc] = corpus
        return real(corpus, tok, desc, progress)

    monkeypatch.setattr(pretrain, "token_array", spy)
    cfg = tiny_config(toy)
    base = ensure_base(cfg, progress=False)
    trained = {name for name, _ in tokenized["pretrain train"].docs}
    held_out = {name for name, _ in tokenized["pretrain val"].docs}
    assert held_out and not trained & held_out

    text = load_tokenizer(base).decode(np.load(base / SOURCE_VAL_FILE).tolist())
    assert "heldout_marker_qzx" in text and "trained_marker_qzx" not in text
    assert any("trained_marker_qzx" in t for _, t in tokenized["pretrain train"].docs)  # the base did learn that one
    # what a run evaluates as its source set is exactly that file
    source = finetune_tokens(cfg, base, progress=False).source
    assert np.array_equal(source, np.load(base / SOURCE_VAL_FILE))


def test_builtin_run_records_forgetting(toy, tiny_config):
    r = train_run(tiny_config(toy), toy / "runs" / "builtin", progress=False)
    assert r["status"] == "ok", r["error"]
    assert all(isinstance(r[k], float) and math.isfinite(r[k]) for k in SOURCE_COLUMNS)
    assert r["source_val_ppl"] == pytest.approx(math.exp(r["source_val_loss"]))
    assert r["forgetting"] == pytest.approx(r["source_val_ppl"] / r["base_source_val_ppl"] - 1)
    assert r["source_val_ppl"] != r["base_source_val_ppl"]  # fine-tuning moved the source perplexity


def test_source_columns_are_empty_without_a_source_set(toy, tiny_config):
    """A user's base without eval.source_data has no source set: None in the row, an empty CSV cell, never 0."""
    user = toy / "user-base"
    if not user.exists():
        shutil.copytree(ensure_base(tiny_config(toy), progress=False), user, ignore=shutil.ignore_patterns("*.npy"))
    cfg = tiny_config(toy, model={"base": str(user)})
    r = train_run(cfg, toy / "runs" / "no-source", progress=False)
    assert r["status"] == "ok", r["error"]
    assert all(r[k] is None for k in SOURCE_COLUMNS)
    row = make_row(
        ablation="a",
        key="",
        value=None,
        value_index=None,
        is_baseline=True,
        seed=0,
        cfg=cfg,
        config_hash="h",
        study_hash="s",
        result=r,
        run_dir="d",
    )
    assert all(row[k] is None for k in SOURCE_COLUMNS)
    header, line = to_csv([row]).splitlines()
    cells = dict(zip(header.split(","), line.split(",")))
    assert all(cells[k] == "" for k in SOURCE_COLUMNS)

    # the same base with eval.source_data: the user's source text is evaluated
    with_source = tiny_config(toy, model={"base": str(user)}, eval={"source_data": str(toy / "pt")})
    r = train_run(with_source, toy / "runs" / "user-source", progress=False)
    assert r["status"] == "ok", r["error"]
    assert all(isinstance(r[k], float) for k in SOURCE_COLUMNS)


def test_source_tokens_are_the_same_for_every_context(toy, tiny_config, monkeypatch):
    """Every run of a study predicts the same eval.source_max_tokens source tokens, before and after fine-tuning,
    whatever its context length."""
    evaluated: list[torch.Tensor] = []
    real = loop.evaluate

    def spy(model, xv, yv, *args):
        evaluated.append(yv)
        return real(model, xv, yv, *args)

    monkeypatch.setattr(loop, "evaluate", spy)
    targets = {}
    for n in (16, 64):
        evaluated.clear()
        cfg = tiny_config(toy, model={"max_position_embeddings": n}, eval={"source_max_tokens": 300})
        assert train_run(cfg, toy / "runs" / f"ctx{n}", progress=False)["status"] == "ok"
        source = [y for y in evaluated if y.shape[1] == n and (y != -100).sum() == 300]
        assert len(source) == 2 and torch.equal(source[0], source[1])  # before and after fine-tuning
        targets[n] = source[0][source[0] != -100]
    assert torch.equal(targets[16], targets[64])


def test_source_data_is_validated_before_any_work(toy, tiny_config, tmp_path, monkeypatch, capsys):
    with pytest.raises(ConfigError, match=r"'eval.source_data': '/no/such/text' is no file, folder or matching glob"):
        tiny_config(toy, eval={"source_data": "/no/such/text"})
    assert tiny_config(toy, eval={"source_data": str(toy / "pt" / "*.py")}).eval.source_data  # a glob that matches
    monkeypatch.setenv("SLM_LORA_CACHE", str(tmp_path / "cache"))
    argv = ["--config", "experiments/configs/abl_lora_rank.yaml", "--lora_rank", "4", "--quick", "--no-progress"]
    argv += ["--out", str(tmp_path / "out"), "--set", "eval.source_data=/no/such/text"]
    assert run.main(argv) == 2
    err = capsys.readouterr().err
    assert "'eval.source_data'" in err and "Traceback" not in err
    assert not (tmp_path / "cache" / "base").exists() and not (tmp_path / "out").exists()  # nothing was started


def test_builtin_source_data_is_the_builtin_bases_held_out_text_for_any_base(toy, tiny_config, monkeypatch):
    """eval.source_data: builtin measures any base's forgetting on the documents the built-in base holds out of its
    pretraining (the Python standard library): with the built-in corpus standing in for that here, a run of the
    built-in base gets its own SOURCE_VAL_FILE, and another base (a copy without it) the same text, tokenized."""
    cfg = tiny_config(toy)
    base = ensure_base(cfg, progress=False)
    planted = load_corpus(str(toy / "pt"))
    monkeypatch.setattr(data_corpus, "builtin_pretrain_corpus", lambda: planted)
    builtin = tiny_config(toy, eval={"source_data": "builtin"})
    assert np.array_equal(finetune_tokens(builtin, base, progress=False).source, np.load(base / SOURCE_VAL_FILE))
    other = toy / "user-base-builtin-source"
    if not other.exists():
        shutil.copytree(base, other, ignore=shutil.ignore_patterns("*.npy"))
    on_other = tiny_config(toy, model={"base": str(other)}, eval={"source_data": "builtin"})
    assert np.array_equal(finetune_tokens(on_other, other, progress=False).source, np.load(base / SOURCE_VAL_FILE))
