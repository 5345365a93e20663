"""LoRAConfig: every bad value gets its exact error message; good values are normalised to plain Python types."""

import json
import math

import numpy as np
import pytest

from lora import LoRAConfig

TARGETS_HELP = "a list of module names, a regex string or 'all-linear'"
EMPTY_LIST = "is empty; name at least one module (e.g. ['q_proj', 'v_proj']) or use 'all-linear'"
EMPTY_STRING = "is an empty string; give module names, a regex, or 'all-linear'"
BAD = [
    (dict(rank=0), ValueError, "rank must be > 0, got 0"),
    (dict(rank=-4), ValueError, "rank must be > 0, got -4"),
    (dict(rank=2.5), TypeError, "rank must be an int, got 2.5 (float)"),
    (dict(rank="8"), TypeError, "rank must be an int, got '8' (str)"),
    (dict(rank=True), TypeError, "rank must be an int, got True (bool)"),
    (dict(alpha=0), ValueError, "alpha must be > 0, got 0"),
    (dict(alpha=-1.0), ValueError, "alpha must be > 0, got -1.0"),
    (dict(alpha=math.inf), TypeError, "alpha must be a finite number, got inf"),
    (dict(alpha=math.nan), TypeError, "alpha must be a finite number, got nan"),
    (dict(alpha=True), TypeError, "alpha must be a finite number, got True"),
    (dict(alpha="8"), TypeError, "alpha must be a finite number, got '8'"),
    (dict(dropout=1.0), ValueError, "dropout must be in [0, 1), got 1.0"),
    (dict(dropout=-0.1), ValueError, "dropout must be in [0, 1), got -0.1"),
    (dict(dropout=1.5), ValueError, "dropout must be in [0, 1), got 1.5"),
    (dict(dropout=True), TypeError, "dropout must be a number in [0, 1), got True"),
    (dict(dropout="0.1"), TypeError, "dropout must be a number in [0, 1), got '0.1'"),
    (dict(target_modules=[]), ValueError, f"target_modules {EMPTY_LIST}"),
    (dict(target_modules=""), ValueError, f"target_modules {EMPTY_STRING}"),
    (
        dict(target_modules="(["),
        ValueError,
        "target_modules='([' is not a valid regex: unterminated character set at position 1",
    ),
    (dict(target_modules={"q_proj"}), TypeError, f"target_modules must be {TARGETS_HELP}, got set"),
    (dict(target_modules=["q_proj", ""]), ValueError, "target_modules must hold non-empty strings, got ''"),
    (dict(target_modules=["q_proj", 3]), ValueError, "target_modules must hold non-empty strings, got 3"),
    (dict(exclude_modules=""), ValueError, f"exclude_modules {EMPTY_STRING}"),
    (dict(exclude_modules=5), TypeError, f"exclude_modules must be {TARGETS_HELP}, got int"),
    (dict(exclude_modules=[""]), ValueError, "exclude_modules must hold non-empty strings, got ''"),
    (dict(use_rslora=1), TypeError, "use_rslora must be a bool, got 1"),
    (dict(init="xavier"), ValueError, "init must be one of ('kaiming', 'gaussian'), got 'xavier'"),
    (dict(bias="some"), ValueError, "bias must be one of ('none', 'all', 'lora_only'), got 'some'"),
]


@pytest.mark.parametrize("kw,error,message", BAD, ids=[str(kw) for kw, _, _ in BAD])
def test_bad_value_names_the_field_and_the_fix(kw, error, message):
    with pytest.raises(error) as e:
        LoRAConfig(**kw)
    assert str(e.value) == message


def test_values_become_plain_python_types():
    """numpy scalars (a sweep grid) and tuples become int / float / list, so the config saves as JSON."""
    cfg = LoRAConfig(
        rank=np.int64(4),
        alpha=np.float32(8),
        dropout=np.float64(0.25),
        target_modules=("q_proj", "v_proj"),
        exclude_modules=("layers.0.q_proj",),
    )
    assert (type(cfg.rank), type(cfg.alpha), type(cfg.dropout)) == (int, float, float)
    assert cfg.target_modules == ["q_proj", "v_proj"] and cfg.exclude_modules == ["layers.0.q_proj"]
    json.dumps(cfg.__dict__)
    assert LoRAConfig(alpha=8).alpha == 8.0 and type(LoRAConfig(alpha=8).alpha) is float


@pytest.mark.parametrize("targets", ["all-linear", r"layers\.\d+\.(q|v)_proj", ["fc1"]])
def test_good_target_specs(targets):
    assert LoRAConfig(target_modules=targets, exclude_modules=[]).target_modules == targets


@pytest.mark.parametrize("use_rslora,scaling", [(False, 32.0 / 16), (True, 32.0 / 4)])
def test_scaling(use_rslora, scaling):
    assert LoRAConfig(rank=16, alpha=32.0, use_rslora=use_rslora).scaling == scaling


def test_rank_one_is_the_smallest_valid_rank():
    assert LoRAConfig(rank=1, alpha=1.0).scaling == 1.0
    with pytest.raises(ValueError, match="rank must be > 0, got 0"):
        LoRAConfig(rank=0)
