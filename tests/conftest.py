"""Fixtures shared by the whole suite: per-test seeding, a private cache folder, a tiny GPT, and the devices.

CI has 2 cores and no GPU; every test is deterministic and single-process unless it says otherwise. Tests that
take the `device` fixture run once per device: on CPU always, on CUDA when torch sees one (skipped otherwise).
"""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import pytest
import torch

from model import GPT, GPTConfig

TINY_GPT = dict(vocab_size=97, n_layer=2, n_head=4, d_model=32, d_ff=64, max_position_embeddings=16)


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same RNG state, so its data does not depend on which tests ran before it."""
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """A private cache folder (SLM_LORA_CACHE) for this test: nothing is read from or left in ~/.cache."""
    path = tmp_path / "cache"
    monkeypatch.setenv("SLM_LORA_CACHE", str(path))
    return path


@pytest.fixture
def tiny_gpt() -> Callable[..., GPT]:
    """A factory of small random GPTs in eval mode: `tiny_gpt("alibi", max_position_embeddings=32)`."""

    def make(kind: str = "rope", **overrides) -> GPT:
        torch.manual_seed(0)
        return GPT(GPTConfig(**{**TINY_GPT, "position_embedding": kind, **overrides})).eval()

    return make


@pytest.fixture(params=["cpu", "cuda"])
def device(request) -> torch.device:
    """The test runs on CPU, and again on CUDA when there is a CUDA device."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device: torch.cuda.is_available() is False")
    return torch.device(request.param)
