"""Typed config sections as dataclasses, checked before any work: unknown keys (with a "did you mean"), types,
ranges and choices, each error naming the file and the dotted key. Generic: the sections themselves live in
`experiments.config.config`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from typing import Any


class ConfigError(ValueError):
    """A config problem a user can fix; the message names the file, the key and what is allowed."""


def choices(*values: Any) -> dict:
    return {"choices": values}


def in_range(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> dict:
    return {"range": (lo, hi, lo_open, hi_open)}


class Sources(str):
    """The source of a config several inputs set (a file, quick.yaml, --set ..., --lr-grid ...): reads as all of
    them, and `where` names the one that set the key an error is about."""

    by_key: dict[str, str]

    def __new__(cls, by_key: dict[str, str], fallback: str = "command line") -> Sources:
        self = super().__new__(cls, ", ".join(dict.fromkeys(by_key.values())) or fallback)
        self.by_key = dict(by_key)
        return self


def where(source: str, key: str, *related: str) -> str:
    """An error's prefix: the input(s) that set `key`, or the `related` keys of a rule between keys (a file, a
    flag), and the key."""
    if isinstance(source, Sources):
        given = [source.by_key[k] for k in (key, *related) if k in source.by_key]
        source = ", ".join(dict.fromkeys(given)) or str(source)
    return f"{source}: '{key}'" if key else source


def unknown_key(source: str, prefix: str, key: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
    return ConfigError(
        f"{where(source, prefix + key)} is not a config key.{hint} Allowed keys here: {', '.join(sorted(known))}."
    )


_NUMBER = re.compile(r"[-+]?(\d[\d_]*\.?\d*|\.\d+)([eE][-+]?\d+)?")


def check_value(source: str, key: str, value: Any, tp: Any, meta: dict) -> Any:
    """Coerce `value` to type `tp` (int->float allowed, nothing else silent) and check range/choices."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):  # only `X | None` appears in the schema
        inner = [t for t in typing.get_args(tp) if t is not type(None)][0]
        return None if value is None else check_value(source, key, value, inner, meta)
    if tp in (int, float) and isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads 3e-4 and 3e5 (no dot) as strings; they mean numbers
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where(source, key)} must be true or false, got {value!r}.")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)  # 3e5 means a whole number; accept it as one
            else:
                raise ConfigError(f"{where(source, key)} must be an integer, got {value!r}.")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where(source, key)} must be a number, got {value!r}.")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{where(source, key)} must be finite, got {value!r}.")
    elif tp is str:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where(source, key)} must be a non-empty string, got {value!r}.")
    elif origin is list:
        if isinstance(value, str):  # "a,b" on the command line; "" or "," is a mistake, not an empty list
            text, value = value, [v.strip() for v in value.split(",") if v.strip()]
            if not value:
                raise ConfigError(
                    f"{where(source, key)} is empty: {text!r} lists nothing; give comma-separated values."
                )
        if not isinstance(value, list):
            raise ConfigError(f"{where(source, key)} must be a list, got {value!r}.")
        (item,) = typing.get_args(tp) or (Any,)
        if item in (int, float, str):  # typed items are each checked, with the field's range or choices
            return [check_value(source, f"{key}[{i}]", v, item, meta) for i, v in enumerate(value)]
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{where(source, key)} must be one of {list(meta['choices'])}, got {value!r}.")
    if "range" in meta:
        lo, hi, lo_open, hi_open = meta["range"]
        bad = (lo is not None and (value <= lo if lo_open else value < lo)) or (
            hi is not None and (value >= hi if hi_open else value > hi)
        )
        if bad:
            lo_s = "-inf" if lo is None else f"{'(' if lo_open else '['}{lo}"
            hi_s = "inf)" if hi is None else f"{hi}{')' if hi_open else ']'}"
            raise ConfigError(f"{where(source, key)} must be in {lo_s}, {hi_s}, got {value!r}.")
    return value


def build(cls: type, data: Any, source: str, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where(source, prefix.rstrip('.'))} must be a mapping of keys, got {data!r}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise unknown_key(source, prefix, str(key), list(fields))
    kwargs = {}
    for name, value in data.items():
        section = section_type(cls, name)
        if section is not None:
            kwargs[name] = None if value is None else build(section, value, source, f"{prefix}{name}.")
        else:
            kwargs[name] = check_value(source, prefix + name, value, hints[name], fields[name].metadata)
    return cls(**kwargs)


def section_type(cls: type, name: str) -> type | None:
    """The dataclass held by field `name` of `cls` (a section such as `train`), None for a plain value."""
    tp = typing.get_type_hints(cls)[name]
    return next((t for t in (tp, *typing.get_args(tp)) if dataclasses.is_dataclass(t)), None)


def set_dotted(d: dict, path: str, value: Any) -> None:
    """d["train"]["lr"] = value for path "train.lr": the one walk over a config held as a plain dict."""
    *sections, leaf = path.split(".")
    for s in sections:
        d = d[s]
    d[leaf] = value


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 0.01}} -> {"train.lr": 0.01}: a config as dotted keys."""
    out: dict[str, Any] = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
