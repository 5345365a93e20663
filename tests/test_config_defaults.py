"""Defaults are written once: experiments/configs/defaults.yaml. The config sections take theirs from it, and the
engine's own Settings defaults are never what the lab runs with (it passes every field)."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

import experiments.config.config as config_mod
from experiments.config.config import DataConfig, LoRASection, TrainConfig, load_config
from experiments.config.schema import ConfigError
from training import loop

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def defaults_yaml(tmp_path, monkeypatch):
    """A copy of defaults.yaml the config reads instead, edited by `edit(old, new)`; the cache of read defaults is
    cleared around each change, so no other test sees the copy."""
    copy = tmp_path / "defaults.yaml"
    copy.write_text(config_mod.DEFAULTS_FILE.read_text(encoding="utf-8"), encoding="utf-8")
    monkeypatch.setattr(config_mod, "DEFAULTS_FILE", copy)
    forget_read_defaults()

    def edit(old: str, new: str) -> None:
        text = copy.read_text(encoding="utf-8")
        assert text.count(old) == 1, old
        copy.write_text(text.replace(old, new), encoding="utf-8")
        forget_read_defaults()  # read once per process otherwise

    yield edit
    forget_read_defaults()


def forget_read_defaults() -> None:
    config_mod._read_defaults.cache_clear()
    config_mod._checked_default.cache_clear()


def test_a_section_built_without_a_key_takes_defaults_yaml_value(defaults_yaml):
    defaults_yaml("  lr: 0.01 ", "  lr: 0.02 ")
    defaults_yaml("  target_modules: [q_proj, v_proj]", "  target_modules: [q_proj, k_proj, v_proj]")
    assert TrainConfig().lr == 0.02 and load_config().train.lr == 0.02
    assert TrainConfig(lr=0.5).lr == 0.5
    a, b = LoRASection(), LoRASection()
    assert a.target_modules == ["q_proj", "k_proj", "v_proj"] and a.target_modules is not b.target_modules


def test_a_default_is_checked_like_any_value(defaults_yaml):
    defaults_yaml("  tokens: 300000 ", "  tokens: 3e5 ")  # YAML 1.1 reads 3e5 as a string: it means the number
    assert TrainConfig().tokens == 300000 and isinstance(TrainConfig().tokens, int)
    defaults_yaml("  warmup_fraction: 0.05", "  warmup_fraction: 1.5")
    with pytest.raises(ConfigError, match=r"defaults.yaml: 'train.warmup_fraction' must be in \[0, 1\), got 1.5"):
        TrainConfig()


def test_a_key_missing_from_defaults_yaml_is_named(defaults_yaml):
    defaults_yaml("  tune_fraction: 0.0 ", "  # tune_fraction removed ")
    with pytest.raises(ConfigError, match=r"defaults.yaml: 'data.tune_fraction' is missing; every config key"):
        DataConfig()


def test_the_lab_gives_the_engine_every_setting():
    """loop.Settings keeps defaults for direct use; every call in the lab names every field, so a change to those
    defaults can never change a run or the base."""
    fields = {f.name for f in dataclasses.fields(loop.Settings)}
    calls = 0
    for path in (REPO / "experiments").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "Settings":
                calls += 1
                assert {k.arg for k in node.keywords} == fields, f"{path}:{node.lineno}"
    assert calls == 2  # the fine-tuning run and each pretraining phase
