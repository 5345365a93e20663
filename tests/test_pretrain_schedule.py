"""The built-in base's length schedule: phase 1 at pretrain.seq_len, then phase 2 at pretrain.long_seq_len."""

import json

import pytest
import torch

from data import TrainSampler
from experiments.base.pretrain import ensure_base
from experiments.config.config import ConfigError, load_config, with_values
from model import from_pretrained


@pytest.fixture
def sampled(monkeypatch) -> list[tuple[int, int]]:
    """(step, sequence length) of every training batch drawn."""
    seen: list[tuple[int, int]] = []
    real = TrainSampler.batch

    def spy(self, step, micro=0):
        x, y = real(self, step, micro)
        seen.append((step, x.shape[1]))
        return x, y

    monkeypatch.setattr(TrainSampler, "batch", spy)
    return seen


def test_schedule_runs_both_phases_and_the_base_sees_both_lengths(
    tmp_path, isolated_cache, toy_corpora, tiny_config, sampled
):
    toy_corpora(tmp_path)
    base = ensure_base(tiny_config(tmp_path), progress=False)  # phase 1: 40 steps at 32, phase 2: 4 steps at 64
    summary = json.loads((base / "pretrain.json").read_text())
    assert [(p["seq_len"], p["steps"], p["tokens"]) for p in summary["phases"]] == [(32, 40, 512 * 40), (64, 4, 2048)]
    assert summary["steps"] == 44 and summary["tokens"] == 512 * 40 + 2048
    assert sorted({n for _, n in sampled}) == [32, 64]
    # phase 2 continues phase 1's step numbering, so it draws windows no phase-1 step drew
    assert min(step for step, n in sampled if n == 64) == 40
    assert max(step for step, n in sampled if n == 32) == 39
    assert json.loads((base / "config.json").read_text())["max_position_embeddings"] == 64

    # each phase folder is a complete model; the base is phase 2's end, which phase 2 moved away from phase 1
    x = torch.randint(0, 320, (2, 64))
    with torch.no_grad():
        final, p2, p1 = (from_pretrained(d)(x) for d in (base, base / "phase2", base / "phase1"))
    assert torch.equal(final, p2) and not torch.allclose(final, p1)
    assert all((base / ph / "tokenizer.json").is_file() for ph in ("phase1", "phase2"))


def test_long_tokens_zero_is_one_phase(tmp_path, isolated_cache, toy_corpora, tiny_config, sampled):
    toy_corpora(tmp_path)
    base = ensure_base(tiny_config(tmp_path, pretrain={"long_tokens": 0}), progress=False)
    summary = json.loads((base / "pretrain.json").read_text())
    assert [p["seq_len"] for p in summary["phases"]] == [32] and summary["steps"] == 40
    assert {n for _, n in sampled} == {32}
    assert json.loads((base / "config.json").read_text())["max_position_embeddings"] == 32


def test_defaults_reach_every_context_of_the_study():
    cfg = load_config()
    assert cfg.pretrain.long_tokens > 0 and cfg.pretrain.long_seq_len >= 2048
    assert cfg.pretrain.long_seq_len > cfg.pretrain.seq_len


@pytest.mark.parametrize(
    "items, words",
    [
        (
            [("pretrain.long_seq_len", 512)],
            ["'pretrain.long_seq_len'", "must exceed pretrain.seq_len", "long_tokens: 0"],
        ),
        ([("pretrain.micro_batch_tokens", 1024)], ["'pretrain.micro_batch_tokens'", "2048-token", "at least 2048"]),
        ([("pretrain.long_tokens", -1)], ["'pretrain.long_tokens'", "must be in [0"]),
        ([("pretrain.long_lr", 0)], ["'pretrain.long_lr'", "must be in (0"]),
    ],
)
def test_schedule_keys_are_validated(items, words):
    with pytest.raises(ConfigError) as e:
        with_values(load_config(), [(k, v, "--set") for k, v in items])
    assert all(w in str(e.value) for w in words), str(e.value)


def test_one_phase_needs_no_long_length():
    cfg = with_values(load_config(), [("pretrain.long_tokens", 0, "--set"), ("pretrain.seq_len", 2048, "--set")])
    assert cfg.pretrain.seq_len == 2048  # long_seq_len (2048) is not checked when there is no phase 2
