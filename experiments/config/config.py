"""The run config: typed sections, YAML loading, dotted overrides, and validation before any work.

A config file is `defaults.yaml` (shared by every ablation) deep-merged with the ablation's own file.
`defaults.yaml` is also the one place a default is written: the sections below take theirs from it (yaml_defaults).
Every key is checked against the dataclasses below: an unknown key, a wrong type or a value out of range
raises `ConfigError` naming the file, the dotted key and what is allowed — before data or models are touched.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import glob
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data.cache import json_hash
from experiments.config.schema import (
    ConfigError,
    Sources,
    build,
    check_value,
    choices,
    flatten,
    in_range,
    section_type,
    set_dotted,
    unknown_key,
    where,
)
from experiments.config.yamlfile import load_yaml, read_yaml
from lora.inject import ROLE_NAMES, SEED_TARGETS
from model import resolve_checkpoint
from model.config import POSITION_EMBEDDINGS

CONFIG_DIR = Path(__file__).parents[1] / "configs"
DEFAULTS_FILE = CONFIG_DIR / "defaults.yaml"

# The names every base resolves (lora.inject's one table): the seed's OPT names and the role names.
TARGET_NAMES = (*SEED_TARGETS, *ROLE_NAMES)
ALPHA_POLICIES = ("fixed", "double_rank", "rslora")


def yaml_defaults(section: str) -> typing.Callable[[type], type]:
    """Class decorator (under @dataclass): each field of a config section takes its default from defaults.yaml
    (`section.field`), read and checked like any config value when a section is first built without it, so
    defaults are written once and a broken defaults.yaml is named as such."""

    def apply(cls: type) -> type:
        for name in cls.__dict__.get("__annotations__", {}):
            declared = cls.__dict__.get(name)
            meta = declared.metadata if isinstance(declared, dataclasses.Field) else {}
            default = functools.partial(_yaml_default, cls, f"{section}.{name}")
            setattr(cls, name, field(default_factory=default, metadata=meta))
        return cls

    return apply


@functools.cache
def _read_defaults(path: Path) -> dict[str, Any]:
    return flatten(read_yaml(path) or {})


def _yaml_default(cls: type, key: str) -> Any:
    return copy.deepcopy(_checked_default(cls, key))  # a list default is each instance's own


@functools.cache
def _checked_default(cls: type, key: str) -> Any:
    raw = _read_defaults(DEFAULTS_FILE)
    if key not in raw:
        raise ConfigError(f"{DEFAULTS_FILE}: '{key}' is missing; every config key has its default there.")
    name = key.rpartition(".")[2]
    meta = {f.name: f for f in dataclasses.fields(cls)}[name].metadata
    return check_value(str(DEFAULTS_FILE), key, raw[key], typing.get_type_hints(cls)[name], meta)


@dataclass
@yaml_defaults("pretrain")
class PretrainConfig:
    """The built-in base model: a small GPT pretrained once on the built-in corpus, then cached."""

    corpus: str  # "builtin" (the Python standard library) or a file, glob, folder, or .jsonl
    vocab_size: int = field(metadata=in_range(256, 65536))
    n_layer: int = field(metadata=in_range(1, 96))
    n_head: int = field(metadata=in_range(1, 128))
    d_model: int = field(metadata=in_range(8, 16384))
    d_ff: int = field(metadata=in_range(8, 65536))
    position_embedding: str = field(metadata=choices(*POSITION_EMBEDDINGS))
    seq_len: int = field(metadata=in_range(8, 65536))
    tokens: int = field(metadata=in_range(1))
    batch_tokens: int = field(metadata=in_range(1))
    micro_batch_tokens: int = field(metadata=in_range(1))
    lr: float = field(metadata=in_range(0, None, lo_open=True))
    # Length schedule: after `tokens` at seq_len, `long_tokens` more at long_seq_len with a fresh warmup and decay
    # from long_lr, so the base has seen every context the study uses (0: one phase). See experiments/base/pretrain.py.
    long_seq_len: int = field(metadata=in_range(8, 65536))
    long_tokens: int = field(metadata=in_range(0))
    long_lr: float = field(metadata=in_range(0, None, lo_open=True))
    weight_decay: float = field(metadata=in_range(0))
    seed: int = field(metadata=in_range(0))


@dataclass
@yaml_defaults("model")
class ModelConfig:
    """The model LoRA adapts, and the context length of fine-tuning and evaluation."""

    base: str  # "builtin", a checkpoint folder, a Hugging Face name (facebook/opt-125m), a .gguf file, smollm2-135m
    max_position_embeddings: int = field(metadata=in_range(8, 1 << 20))
    dropout: float = field(metadata=in_range(0, 1, hi_open=True))


@dataclass
@yaml_defaults("data")
class DataConfig:
    """Fine-tuning text: "builtin" (installed package sources) or a file, glob, folder, or .jsonl."""

    finetune: str
    text_field: str
    val_fraction: float = field(metadata=in_range(0, 1, lo_open=True, hi_open=True))
    # Documents held out to choose the learning rate, disjoint from training and validation; 0: none. A sweep
    # with `ablation.lr_grid` sets it from `ablation.tune_fraction`; validation documents never change.
    tune_fraction: float = field(metadata=in_range(0, 1, hi_open=True))


@dataclass
@yaml_defaults("lora")
class LoRASection:
    """LoRA hyper-parameters; `alpha_policy` decides what the rank sweep holds fixed."""

    rank: int = field(metadata=in_range(1, 4096))
    alpha: float = field(metadata=in_range(0, None, lo_open=True))
    # fixed: scaling alpha/rank; double_rank: alpha = 2*rank (scaling 2); rslora: alpha/sqrt(rank)
    alpha_policy: str = field(metadata=choices(*ALPHA_POLICIES))
    dropout: float = field(metadata=in_range(0, 1, hi_open=True))
    target_modules: list[str]
    init: str = field(metadata=choices("kaiming", "gaussian"))

    def resolved_alpha(self) -> float:
        return 2.0 * self.rank if self.alpha_policy == "double_rank" else self.alpha


@dataclass
@yaml_defaults("train")
class TrainConfig:
    """A run is a token budget; tokens per optimizer step stay fixed across the values of an ablation."""

    tokens: int = field(metadata=in_range(1))
    batch_tokens: int = field(metadata=in_range(1))  # per optimizer step
    micro_batch_tokens: int = field(metadata=in_range(1))  # per forward/backward
    lr: float = field(metadata=in_range(0, None, lo_open=True))
    min_lr_ratio: float = field(metadata=in_range(0, 1))
    warmup_fraction: float = field(metadata=in_range(0, 1, hi_open=True))
    weight_decay: float = field(metadata=in_range(0))
    grad_clip: float = field(metadata=in_range(0))  # 0 disables clipping
    dtype: str = field(metadata=choices("auto", "float32", "bfloat16", "float16"))
    device: str = field(metadata=choices("auto", "cpu", "cuda"))
    compile: bool
    activation_checkpointing: bool
    seed: int = field(metadata=in_range(0))
    log_every: int = field(metadata=in_range(1))
    checkpoint_every: int = field(metadata=in_range(0))  # steps between resumable checkpoints; 0: none


@dataclass
@yaml_defaults("eval")
class EvalConfig:
    """Validation: the same held-out tokens for every run on a corpus, cut into context-length windows."""

    max_tokens: int = field(metadata=in_range(1))
    every_steps: int = field(metadata=in_range(0))  # 0: evaluate only at the end
    # Forgetting: text of the base's own (source) domain, evaluated before and after fine-tuning. Unset: the built-in
    # base's held-out pretraining documents; a user's base then has none (its source columns stay empty).
    source_data: str | None  # a file, glob, folder or .jsonl, as --data accepts; builtin: the stdlib held out
    source_max_tokens: int = field(metadata=in_range(1))


@dataclass
class AblationConfig:
    """The swept key (a dotted path or one of ABLATION_ALIASES) and its values."""

    name: str | None = None  # None: the config file's name
    key: str | None = None  # None in a grid study, which names its keys in `grid`
    values: list[Any] = field(default_factory=list)
    baseline: Any = None
    # Every value trains at every learning rate here; each value's lr is chosen by its loss on a tune split.
    lr_grid: list[float] = field(default_factory=list, metadata=in_range(0, None, lo_open=True))
    tune_fraction: float = field(default=0.1, metadata=in_range(0, 1, lo_open=True, hi_open=True))
    # Several keys swept jointly instead of `key`/`values`: {dotted key: [values]}, every combination (a cell) x seeds;
    # `baseline` is then a {key: value} mapping (default: each key's first value). See experiments/sweep/grid.py.
    grid: dict[str, list[Any]] = field(default_factory=dict)
    # Successive halving over a grid's cells (experiments/sweep/halving.py): rungs keep the better half on a tune split.
    halving: bool = False


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
        return json_hash(d)


# The seed's command-line names for the three swept keys.
ABLATION_ALIASES = {
    "lora_rank": "lora.rank",
    "target_modules": "lora.target_modules",
    "max_position_embeddings": "model.max_position_embeddings",
}


def _check_semantics(cfg: Config, source: str) -> None:
    """Cross-field rules the per-key checks cannot see."""
    targets = cfg.lora.target_modules
    if not targets:
        raise ConfigError(
            f"{where(source, 'lora.target_modules')} is empty; name at least one of {list(TARGET_NAMES)}."
        )
    for t in targets:
        if not isinstance(t, str) or not t:
            raise ConfigError(f"{where(source, 'lora.target_modules')} entries must be module names, got {t!r}.")
    if cfg.data.val_fraction + cfg.data.tune_fraction >= 1.0:
        at = where(source, "data.tune_fraction", "data.val_fraction")
        raise ConfigError(f"{at} + data.val_fraction must stay below 1 (training needs documents).")
    if cfg.train.micro_batch_tokens > cfg.train.batch_tokens:
        raise ConfigError(
            f"{where(source, 'train.micro_batch_tokens', 'train.batch_tokens')} ({cfg.train.micro_batch_tokens}) "
            f"must not exceed train.batch_tokens ({cfg.train.batch_tokens})."
        )
    p = cfg.pretrain
    # A step holds whole sequences: one longer than the step's budget would silently grow the step to its length.
    seq, budget = cfg.model.max_position_embeddings, cfg.train.batch_tokens
    if seq > budget:
        at = where(source, "model.max_position_embeddings", "train.batch_tokens")
        raise ConfigError(
            f"{at} ({seq}) is longer than train.batch_tokens ({budget}): an optimizer step holds whole sequences, "
            f"so every step would train {seq} tokens instead of {budget}. "
            f"Use a context of at most {budget} tokens, or raise train.batch_tokens (the same for every value of an "
            "ablation)."
        )
    if p.d_model % p.n_head:
        at = where(source, "pretrain.d_model", "pretrain.n_head")
        raise ConfigError(f"{at} ({p.d_model}) must be divisible by pretrain.n_head ({p.n_head}).")
    if p.micro_batch_tokens > p.batch_tokens:
        at = where(source, "pretrain.micro_batch_tokens", "pretrain.batch_tokens")
        raise ConfigError(f"{at} must not exceed pretrain.batch_tokens.")
    if p.long_tokens and p.long_seq_len <= p.seq_len:
        at = where(source, "pretrain.long_seq_len", "pretrain.seq_len", "pretrain.long_tokens")
        raise ConfigError(
            f"{at} ({p.long_seq_len}) must exceed pretrain.seq_len ({p.seq_len}): "
            "the second phase trains on longer sequences. Raise it, or set pretrain.long_tokens: 0 for one phase."
        )
    longest = max(p.seq_len, p.long_seq_len if p.long_tokens else 0)
    if longest > p.micro_batch_tokens:
        at = where(
            source, "pretrain.micro_batch_tokens", "pretrain.seq_len", "pretrain.long_seq_len", "pretrain.long_tokens"
        )
        raise ConfigError(
            f"{at} ({p.micro_batch_tokens}) is shorter than one "
            f"{longest}-token pretraining sequence; raise it (and pretrain.batch_tokens) to at least {longest}."
        )
    if cfg.eval.source_data not in (None, "builtin") and _names_nothing(cfg.eval.source_data):
        raise ConfigError(
            f"{where(source, 'eval.source_data')}: {cfg.eval.source_data!r} is no file, folder or matching glob. "
            "Give text of the base model's own domain (.txt/.md/.py files, a folder, a glob, or a .jsonl), or leave "
            "it unset: the built-in base then uses its held-out pretraining documents (builtin: those for any base)."
        )
    if cfg.ablation is not None and cfg.ablation.lr_grid and cfg.data.val_fraction + cfg.ablation.tune_fraction >= 1:
        at = where(source, "ablation.tune_fraction", "data.val_fraction", "ablation.lr_grid")
        raise ConfigError(
            f"{at} ({cfg.ablation.tune_fraction}) + data.val_fraction ({cfg.data.val_fraction}) must stay below 1: "
            "an lr grid holds out both, and training needs documents."
        )
    if cfg.ablation is not None and (cfg.ablation.grid or cfg.ablation.halving):
        _check_grid(cfg, source)
    elif cfg.ablation is not None:
        a = cfg.ablation
        if not a.key or not a.values:
            raise ConfigError(f"{where(source, 'ablation')} needs a 'key' and a non-empty 'values' list.")
        resolve_key(a.key, source)
        if a.baseline is not None and a.baseline not in a.values:
            raise ConfigError(
                f"{where(source, 'ablation.baseline')} {a.baseline!r} is not one of the ablation values {a.values}."
            )
        if a.lr_grid and (len(a.lr_grid) < 2 or len(set(a.lr_grid)) != len(a.lr_grid)):
            raise ConfigError(
                f"{where(source, 'ablation.lr_grid')} needs at least two distinct learning rates, got {a.lr_grid}."
            )
        if a.lr_grid and resolve_key(a.key) == "train.lr":
            raise ConfigError(
                f"{where(source, 'ablation.lr_grid', 'ablation.key')}: this ablation already sweeps train.lr."
            )
        for v in a.values:  # every swept value must itself be a valid config
            with_value(cfg, a.key, v, source=_for_value(source, a.key, f"ablation value {v!r}", "ablation.values"))


def _check_grid(cfg: Config, source: str) -> None:
    """A grid: two or more distinct keys, each with distinct valid values, no `key`/`values` beside it, a baseline
    mapping that names grid values, and an lr grid (if any) that does not sweep train.lr."""
    a, at = cfg.ablation, where(source, "ablation.grid")
    if not isinstance(a.grid, dict) or len(a.grid) < 2:
        raise ConfigError(
            f"{at} must map two or more keys to lists of values, e.g. {{lora.rank: [4, 16], lora.target_modules: "
            f"[[q_proj, v_proj], all-linear]}}, got {a.grid!r} (ablation.halving needs a grid; one key is an "
            "ordinary ablation: key and values)."
        )
    if a.key or a.values:
        raise ConfigError(f"{at}: a grid names its keys itself; remove ablation.key and ablation.values.")
    paths = [resolve_key(str(k), source) for k in a.grid]
    if len(set(paths)) != len(paths) or "train.seed" in paths:
        raise ConfigError(f"{at} names a key twice (or train.seed, which --seeds sets): {list(a.grid)}.")
    for k, vs in a.grid.items():
        if not isinstance(vs, list) or not vs or len({json_hash(v) for v in vs}) != len(vs):
            raise ConfigError(f"{where(source, f'ablation.grid.{k}')} must be a list of distinct values, got {vs!r}.")
        for v in vs:  # every grid value must itself be a valid config
            with_value(cfg, k, v, source=_for_value(source, k, f"ablation.grid value {k}={v!r}", "ablation.grid"))
    base = a.baseline if a.baseline is not None else {}
    if not isinstance(base, dict) or any(k not in a.grid or v not in a.grid[k] for k, v in base.items()):
        raise ConfigError(
            f"{where(source, 'ablation.baseline')} of a grid is a mapping from grid keys to one of their values "
            f"(default: each key's first), got {a.baseline!r}; the grid is {a.grid!r}."
        )
    if a.lr_grid and (len(a.lr_grid) < 2 or len(set(a.lr_grid)) != len(a.lr_grid) or "train.lr" in paths):
        raise ConfigError(
            f"{where(source, 'ablation.lr_grid')} needs two or more distinct learning rates and a grid without "
            f"train.lr, got {a.lr_grid}."
        )


def _for_value(source: str, key: str, label: str, listed_in: str) -> str:
    """The source of one swept value's config: `label` ("ablation value 16") for its key, after the input that
    set the list it is in (`listed_in`) if the command line did; whatever set the other keys for those."""
    if isinstance(source, Sources):
        given = source.by_key.get(listed_in)
        return Sources({**source.by_key, resolve_key(key, source): f"{given} ({label})" if given else label})
    return f"{source} ({label})"


def _resolve_base(cfg: Config, source: str) -> Config:
    """`cfg` with model.base as the folder every run loads: a Hugging Face model name is resolved now (the Hugging
    Face cache, or a download when online), before any work, and every run and process then uses that folder."""
    if cfg.model.base == "builtin":
        return cfg
    try:
        folder = resolve_checkpoint(cfg.model.base)
    except FileNotFoundError as e:
        raise ConfigError(f"{where(source, 'model.base')}: {e}") from None
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, base=str(folder)))


def _names_nothing(spec: str) -> bool:
    """A corpus path (file, folder or glob) that names nothing."""
    p = Path(spec).expanduser()
    return not p.exists() and not (glob.has_magic(spec) and glob.glob(str(p), recursive=True))


def resolve_key(key: str, source: str = "command line") -> str:
    """Map an alias (`lora_rank`) or a dotted path (`train.lr`) to a dotted path that exists."""
    path = ABLATION_ALIASES.get(key, key)
    cls: Any = Config
    parts = path.split(".")
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            known = names if i else names + list(ABLATION_ALIASES)
            raise unknown_key(source, ".".join(parts[:i]) + ("." if i else ""), part, known)
        section = section_type(cls, part)
        if i < len(parts) - 1:
            if section is None:
                raise ConfigError(f"{where(source, key)}: '{'.'.join(parts[: i + 1])}' has no sub-keys.")
            cls = section
        elif section is not None:
            raise ConfigError(f"{where(source, key)} is a section; name one of its keys.")
    return path


def from_dict(data: dict, source: str = "config") -> Config:
    """Build and fully validate a Config from a plain dict (YAML, JSON, or a run's saved config)."""
    cfg = _resolve_base(build(Config, data, source, ""), source)
    _check_semantics(cfg, source)
    return cfg


def parse_value(text: str) -> Any:
    """A command-line value, read as YAML so `3e-4`, `true`, `[q_proj, v_proj]` mean what they look like."""
    try:
        return load_yaml(text, "command line")
    except ConfigError:
        return text


def with_value(cfg: Config, key: str, value: Any, source: str = "command line") -> Config:
    """A copy of `cfg` with one dotted key set, validated like a file would be."""
    data, path = cfg.to_dict(), resolve_key(key, source)
    set_dotted(data, path, value)
    data.pop("ablation")
    new = _resolve_base(build(Config, data, source, ""), source)
    new.ablation = cfg.ablation
    section, _, leaf = path.partition(".")
    if section == "ablation":  # only the key set is checked: an ablation may leave its name (and more) unset
        checked = getattr(build(AblationConfig, {leaf: value}, source, "ablation."), leaf)
        new.ablation = dataclasses.replace(cfg.ablation, **{leaf: checked})
    _check_semantics(dataclasses.replace(new, ablation=None), source)
    return new


def with_values(cfg: Config, items: list[tuple[str, Any, str]]) -> Config:
    """A copy of `cfg` with several dotted keys set at once: items are (key, value, source), e.g. from `--set`.

    Each value is checked on its own (type, range, choices) and blamed on its own source; the cross-field rules
    (and every ablation value) are checked once all are set, so `batch_tokens` and `micro_batch_tokens` can be
    lowered together in either order.
    """
    data, by_key = cfg.to_dict(), {}
    for key, value, source in items:
        path = resolve_key(key, source)
        by_key[path] = source
        *sections, leaf = path.split(".")
        cls: Any = Config
        for s in sections:
            cls = section_type(cls, s)
        f = {f.name: f for f in dataclasses.fields(cls)}[leaf]
        checked = check_value(source, path, value, typing.get_type_hints(cls)[leaf], f.metadata)
        if data.get(sections[0]) is None:  # a config without an `ablation:` block
            raise ConfigError(f"{where(source, path)}: this config has no '{sections[0]}' section to set it in.")
        set_dotted(data, path, checked)
    return from_dict(data, source=Sources(by_key))


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
    data = read_yaml(path)
    if data is None:
        raise ConfigError(
            f"{path} is empty (or only comments). A config sets what differs from {DEFAULTS_FILE.name}: an "
            "'ablation:' block (name, key, values) to sweep, or sections such as 'train:'. To run the defaults as "
            "one run, write {} in it."
        )
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
