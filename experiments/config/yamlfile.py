"""YAML read strictly: UTF-8 text, and no key twice in one mapping.

PyYAML's safe_load keeps the last of two equal keys without a word, so a config that sets `lr` twice runs with
whichever came last; here that is an error naming both lines. Merge keys (`<<: *base`) may still override.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from experiments.config.schema import ConfigError


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, first: yaml.Mark, again: yaml.Mark) -> None:
        super().__init__(f"key {key!r} appears twice in one mapping (lines {first.line + 1} and {again.line + 1})")


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key repeated in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark)
            except TypeError:  # an unhashable key: SafeLoader reports it itself below
                continue
            if first is not key_node.start_mark:
                raise _DuplicateKey(key, first, key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str, source: str) -> Any:
    """Parse YAML text strictly; errors are ConfigError naming `source`."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader: plain data only
    except _DuplicateKey as e:
        raise ConfigError(f"{source}: {e}; YAML would silently keep the last one. Remove one of them.") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from None


def read_yaml(path: Path) -> Any:
    """A YAML file's content (None when empty); unreadable, non-UTF-8 or invalid files raise ConfigError."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror}).") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {raw[e.start]:#04x} on line {line}). Save the file as UTF-8."
        ) from None
    return load_yaml(text, str(path))
