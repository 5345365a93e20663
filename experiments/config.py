"""The run config: typed sections, YAML loading, dotted overrides, and validation before any work.

A config file is `defaults.yaml` (shared by every ablation) deep-merged with the ablation's own file.
Every key is checked against the dataclasses below: an unknown key, a wrong type or a value out of range
raises `ConfigError` naming the file, the dotted key and what is allowed — before data or models are touched.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULTS_FILE = CONFIG_DIR / "defaults.yaml"

TARGET_NAMES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
POSITION_KINDS = ("learned", "sinusoidal", "rope", "alibi", "none")
ALPHA_POLICIES = ("fixed", "double_rank", "rslora")


class ConfigError(ValueError):
    """A config problem a user can fix; the message names the file, the key and what is allowed."""


def _choices(*values: Any) -> dict:
    return {"choices": values}


def _range(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> dict:
    return {"range": (lo, hi, lo_open, hi_open)}


@dataclass
class PretrainConfig:
    """The built-in base model: a small GPT pretrained once on the built-in corpus, then cached."""

    corpus: str = "builtin"  # "builtin" (the Python standard library) or a file, glob, folder, or .jsonl
    vocab_size: int = field(default=8192, metadata=_range(256, 65536))
    n_layer: int = field(default=4, metadata=_range(1, 96))
    n_head: int = field(default=4, metadata=_range(1, 128))
    d_model: int = field(default=128, metadata=_range(8, 16384))
    d_ff: int = field(default=512, metadata=_range(8, 65536))
    position_embedding: str = field(default="rope", metadata=_choices(*POSITION_KINDS))
    seq_len: int = field(default=512, metadata=_range(8, 65536))
    tokens: int = field(default=2_000_000, metadata=_range(1))
    batch_tokens: int = field(default=8192, metadata=_range(1))
    micro_batch_tokens: int = field(default=8192, metadata=_range(1))
    lr: float = field(default=3e-3, metadata=_range(0, None, lo_open=True))
    weight_decay: float = field(default=0.1, metadata=_range(0))
    seed: int = field(default=1234, metadata=_range(0))


@dataclass
class ModelConfig:
    """The model LoRA adapts, and the context length of fine-tuning and evaluation."""

    base: str = "builtin"  # "builtin" or a local OPT / GPT-2 checkpoint folder
    max_position_embeddings: int = field(default=512, metadata=_range(8, 1 << 20))
    dropout: float = field(default=0.0, metadata=_range(0, 1, hi_open=True))


@dataclass
class DataConfig:
    """Fine-tuning text: "builtin" (installed package sources) or a file, glob, folder, or .jsonl."""

    finetune: str = "builtin"
    text_field: str = "text"
    val_fraction: float = field(default=0.1, metadata=_range(0, 1, lo_open=True, hi_open=True))


@dataclass
class LoRASection:
    """LoRA hyper-parameters; `alpha_policy` decides what the rank sweep holds fixed."""

    rank: int = field(default=16, metadata=_range(1, 4096))
    alpha: float = field(default=32.0, metadata=_range(0, None, lo_open=True))
    # fixed: scaling alpha/rank; double_rank: alpha = 2*rank (scaling 2); rslora: alpha/sqrt(rank)
    alpha_policy: str = field(default="fixed", metadata=_choices(*ALPHA_POLICIES))
    dropout: float = field(default=0.0, metadata=_range(0, 1, hi_open=True))
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    init: str = field(default="kaiming", metadata=_choices("kaiming", "gaussian"))

    def resolved_alpha(self) -> float:
        return 2.0 * self.rank if self.alpha_policy == "double_rank" else self.alpha


@dataclass
class TrainConfig:
    """A run is a token budget; tokens per optimizer step stay fixed across the values of an ablation."""

    tokens: int = field(default=300_000, metadata=_range(1))
    batch_tokens: int = field(default=8192, metadata=_range(1))  # per optimizer step
    micro_batch_tokens: int = field(default=4096, metadata=_range(1))  # per forward/backward
    lr: float = field(default=1e-2, metadata=_range(0, None, lo_open=True))
    min_lr_ratio: float = field(default=0.1, metadata=_range(0, 1))
    warmup_fraction: float = field(default=0.05, metadata=_range(0, 1, hi_open=True))
    weight_decay: float = field(default=0.0, metadata=_range(0))
    grad_clip: float = field(default=1.0, metadata=_range(0))  # 0 disables clipping
    dtype: str = field(default="auto", metadata=_choices("auto", "float32", "bfloat16", "float16"))
    device: str = field(default="auto", metadata=_choices("auto", "cpu", "cuda"))
    compile: bool = False
    activation_checkpointing: bool = False
    seed: int = field(default=0, metadata=_range(0))
    log_every: int = field(default=10, metadata=_range(1))
    checkpoint_every: int = field(default=100, metadata=_range(0))  # steps between resumable checkpoints; 0: none


@dataclass
class EvalConfig:
    """Validation: the same held-out tokens for every run on a corpus, cut into context-length windows."""

    max_tokens: int = field(default=65536, metadata=_range(1))
    every_steps: int = field(default=0, metadata=_range(0))  # 0: evaluate only at the end


@dataclass
class AblationConfig:
    """The swept key (a dotted path or one of ABLATION_ALIASES) and its values."""

    name: str = ""
    key: str = ""
    values: list[Any] = field(default_factory=list)
    baseline: Any = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoRASection = field(default_factory=LoRASection)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    ablation: AblationConfig | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """Identity of a run: everything that changes its result (the ablation block does not)."""
        d = self.to_dict()
        d.pop("ablation")
        blob = json.dumps(d, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# The seed's command-line names for the three swept keys.
ABLATION_ALIASES = {
    "lora_rank": "lora.rank",
    "target_modules": "lora.target_modules",
    "max_position_embeddings": "model.max_position_embeddings",
}


# ----------------------------------------------------------------------------- building and checking


def _where(source: str, key: str) -> str:
    return f"{source}: '{key}'" if key else source


def _unknown_key(source: str, prefix: str, key: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
    return ConfigError(
        f"{_where(source, prefix + key)} is not a config key.{hint} Allowed keys here: {', '.join(sorted(known))}."
    )


_NUMBER = re.compile(r"[-+]?(\d[\d_]*\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _check_value(source: str, key: str, value: Any, tp: Any, meta: dict) -> Any:
    """Coerce `value` to type `tp` (int->float allowed, nothing else silent) and check range/choices."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):  # only `X | None` appears in the schema
        inner = [t for t in typing.get_args(tp) if t is not type(None)][0]
        return None if value is None else _check_value(source, key, value, inner, meta)
    if tp in (int, float) and isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads 3e-4 and 3e5 (no dot) as strings; they mean numbers
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{_where(source, key)} must be true or false, got {value!r}.")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)  # 3e5 means a whole number; accept it as one
            else:
                raise ConfigError(f"{_where(source, key)} must be an integer, got {value!r}.")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{_where(source, key)} must be a number, got {value!r}.")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{_where(source, key)} must be finite, got {value!r}.")
    elif tp is str:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{_where(source, key)} must be a non-empty string, got {value!r}.")
    elif origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{_where(source, key)} must be a list, got {value!r}.")
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{_where(source, key)} must be one of {list(meta['choices'])}, got {value!r}.")
    if "range" in meta:
        lo, hi, lo_open, hi_open = meta["range"]
        bad = (lo is not None and (value <= lo if lo_open else value < lo)) or (
            hi is not None and (value >= hi if hi_open else value > hi)
        )
        if bad:
            lo_s = "-inf" if lo is None else f"{'(' if lo_open else '['}{lo}"
            hi_s = "inf)" if hi is None else f"{hi}{')' if hi_open else ']'}"
            raise ConfigError(f"{_where(source, key)} must be in {lo_s}, {hi_s}, got {value!r}.")
    return value


def _build(cls: type, data: Any, source: str, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{_where(source, prefix.rstrip('.'))} must be a mapping of keys, got {data!r}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise _unknown_key(source, prefix, str(key), list(fields))
    kwargs = {}
    for name, value in data.items():
        tp, meta = hints[name], fields[name].metadata
        sub = [t for t in (tp, *typing.get_args(tp)) if dataclasses.is_dataclass(t)]
        if sub:
            kwargs[name] = None if value is None else _build(sub[0], value, source, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_value(source, prefix + name, value, tp, meta)
    return cls(**kwargs)


def _check_semantics(cfg: Config, source: str) -> None:
    """Cross-field rules the per-key checks cannot see."""
    targets = cfg.lora.target_modules
    if not targets:
        raise ConfigError(
            f"{_where(source, 'lora.target_modules')} is empty; name at least one of {list(TARGET_NAMES)}."
        )
    for t in targets:
        if not isinstance(t, str) or not t:
            raise ConfigError(f"{_where(source, 'lora.target_modules')} entries must be module names, got {t!r}.")
    if cfg.train.micro_batch_tokens > cfg.train.batch_tokens:
        raise ConfigError(
            f"{_where(source, 'train.micro_batch_tokens')} ({cfg.train.micro_batch_tokens}) "
            f"must not exceed train.batch_tokens ({cfg.train.batch_tokens})."
        )
    p = cfg.pretrain
    if p.d_model % p.n_head:
        raise ConfigError(
            f"{_where(source, 'pretrain.d_model')} ({p.d_model}) must be divisible by pretrain.n_head ({p.n_head})."
        )
    if p.micro_batch_tokens > p.batch_tokens:
        raise ConfigError(f"{_where(source, 'pretrain.micro_batch_tokens')} must not exceed pretrain.batch_tokens.")
    if cfg.model.base != "builtin" and not Path(cfg.model.base).is_dir():
        raise ConfigError(
            f"{_where(source, 'model.base')}: {cfg.model.base!r} is not a folder. Give 'builtin' "
            "or a local OPT / GPT-2 checkpoint folder (config.json + model.safetensors)."
        )
    if cfg.ablation is not None:
        a = cfg.ablation
        if not a.key or not a.values:
            raise ConfigError(f"{_where(source, 'ablation')} needs a 'key' and a non-empty 'values' list.")
        resolve_key(a.key, source)
        if a.baseline is not None and a.baseline not in a.values:
            raise ConfigError(
                f"{_where(source, 'ablation.baseline')} {a.baseline!r} is not one of the ablation values {a.values}."
            )
        for v in a.values:  # every swept value must itself be a valid config
            with_value(cfg, a.key, v, source=f"{source} (ablation value {v!r})")


def resolve_key(key: str, source: str = "command line") -> str:
    """Map an alias (`lora_rank`) or a dotted path (`train.lr`) to a dotted path that exists."""
    path = ABLATION_ALIASES.get(key, key)
    cls: Any = Config
    parts = path.split(".")
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            known = names if i else names + list(ABLATION_ALIASES)
            raise _unknown_key(source, ".".join(parts[:i]) + ("." if i else ""), part, known)
        tp = typing.get_type_hints(cls)[part]
        sub = [t for t in (tp, *typing.get_args(tp)) if dataclasses.is_dataclass(t)]
        if i < len(parts) - 1:
            if not sub:
                raise ConfigError(f"{_where(source, key)}: '{'.'.join(parts[: i + 1])}' has no sub-keys.")
            cls = sub[0]
        elif sub:
            raise ConfigError(f"{_where(source, key)} is a section; name one of its keys.")
    return path


def from_dict(data: dict, source: str = "config") -> Config:
    """Build and fully validate a Config from a plain dict (YAML, JSON, or a run's saved config)."""
    cfg = _build(Config, data, source, "")
    _check_semantics(cfg, source)
    return cfg


def parse_value(text: str) -> Any:
    """A command-line value, read as YAML so `3e-4`, `true`, `[q_proj, v_proj]` mean what they look like."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def with_value(cfg: Config, key: str, value: Any, source: str = "command line") -> Config:
    """A copy of `cfg` with one dotted key set, validated like a file would be."""
    path = resolve_key(key, source)
    data = cfg.to_dict()
    node = data
    *parents, leaf = path.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    ablation = data.pop("ablation")
    new = _build(Config, data, source, "")
    new.ablation = cfg.ablation if ablation is None else _build(AblationConfig, ablation, source, "ablation.")
    _check_semantics(dataclasses.replace(new, ablation=None), source)
    return new


def with_values(cfg: Config, items: list[tuple[str, Any, str]]) -> Config:
    """A copy of `cfg` with several dotted keys set at once: items are (key, value, source), e.g. from `--set`.

    Each value is checked on its own (type, range, choices) and blamed on its own source; the cross-field rules
    (and every ablation value) are checked once all are set, so `batch_tokens` and `micro_batch_tokens` can be
    lowered together in either order.
    """
    data = cfg.to_dict()
    for key, value, source in items:
        path = resolve_key(key, source)
        *parents, leaf = path.split(".")
        node, cls = data, Config
        for p in parents:
            if node.get(p) is None:
                raise ConfigError(f"{_where(source, path)}: this config has no '{p}' section to set it in.")
            node = node[p]
            cls = next(
                t
                for t in (typing.get_type_hints(cls)[p], *typing.get_args(typing.get_type_hints(cls)[p]))
                if dataclasses.is_dataclass(t)
            )
        f = {f.name: f for f in dataclasses.fields(cls)}[leaf]
        node[leaf] = _check_value(source, path, value, typing.get_type_hints(cls)[leaf], f.metadata)
    return from_dict(data, source=", ".join(dict.fromkeys(s for _, _, s in items)) or "command line")


def get_value(cfg: Config, key: str) -> Any:
    node: Any = cfg
    for part in resolve_key(key).split("."):
        node = getattr(node, part)
    return node


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file. The built-in ones are in {CONFIG_DIR}.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}.")
    return data


def load_config(path: str | Path | None = None) -> Config:
    """defaults.yaml, deep-merged with `path` if given, validated. Errors name the file that holds the key."""
    defaults = _read_yaml(DEFAULTS_FILE)
    from_dict(defaults, str(DEFAULTS_FILE))  # a broken defaults file is blamed on itself
    if path is None:
        return from_dict(defaults, str(DEFAULTS_FILE))
    path = Path(path)
    return from_dict(_deep_merge(defaults, _read_yaml(path)), str(path))
