"""Batches: training windows as a pure function of (seed, step, micro-batch), DDP sharding, validation windows."""

import numpy as np
import pytest
import torch

from data import IGNORE_INDEX, TrainSampler, val_windows

IDS = np.arange(100_000, dtype=np.uint32)  # token value = position: windows are checkable by eye


def test_shapes_shift_and_bounds():
    s = TrainSampler(IDS, seq_len=64, batch_size=8, seed=3)
    x, y = s.batch(step=5, micro=2)
    assert x.shape == y.shape == (8, 64) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1) and torch.equal(x[:, 1:], x[:, :-1] + 1)  # contiguous windows, shifted by one
    tiny = TrainSampler(IDS[:65], seq_len=64, batch_size=4, seed=0)  # exactly one window fits
    assert torch.equal(tiny.batch(0)[1][:, -1], torch.full((4,), 64))
    with pytest.raises(ValueError, match="at least seq_len"):
        TrainSampler(IDS[:64], seq_len=64, batch_size=1, seed=0)


def test_deterministic_and_resumable():
    a = TrainSampler(IDS, 32, 4, seed=1)
    b = TrainSampler(IDS, 32, 4, seed=1)  # a fresh sampler "resumed" at step 7 draws the same batch
    assert all(torch.equal(u, v) for u, v in zip(a.batch(7, 1), b.batch(7, 1)))
    assert not torch.equal(a.batch(7, 1)[0], a.batch(8, 1)[0])
    assert not torch.equal(a.batch(7, 1)[0], a.batch(7, 0)[0])
    assert not torch.equal(a.batch(7, 1)[0], TrainSampler(IDS, 32, 4, seed=2).batch(7, 1)[0])


def test_val_windows_predict_each_token_once_for_every_context():
    ids = IDS[:10_000]
    max_tokens = 4096
    for seq_len in (256, 512, 1024, 2048, 300):
        x, y = val_windows(ids, seq_len, max_tokens)
        assert x.shape == y.shape == (-(-max_tokens // seq_len), seq_len) and x.dtype == torch.int64
        valid = y != IGNORE_INDEX
        assert torch.equal(x[valid] + 1, y[valid])  # the input right before each predicted token
        got = sorted(y[valid].tolist())
        assert got == list(range(1, max_tokens + 1))  # ids[1 : max_tokens + 1], each once, for every seq_len
        assert torch.equal(x[:, 0], torch.arange(0, x.shape[0] * seq_len, seq_len))  # windows overlap by one token
    assert (val_windows(ids, 300, max_tokens)[1] == IGNORE_INDEX).sum() == 300 * 14 - 4096  # padded tail only
    x, y = val_windows(ids[:100], 64, max_tokens)  # fewer tokens than asked: all of them, 99 predicted
    assert (y != IGNORE_INDEX).sum() == 99
    with pytest.raises(ValueError, match="at least 2"):
        val_windows(ids[:1], 64, max_tokens)
