"""Put LoRALinear into a model: matching target names, wrapping, freezing, merge/unmerge, counting."""

from __future__ import annotations

import dataclasses
import re

from torch import nn

from .config import LoRAConfig
from .layer import LoRALinear

TargetSpec = list[str] | str


def _is_head(name: str, module: nn.Module, model: nn.Module) -> bool:
    """The output head, which "all-linear" leaves alone: `lm_head`, or what get_output_embeddings() returns."""
    get_head = getattr(model, "get_output_embeddings", None)
    return name.rsplit(".", 1)[-1] == "lm_head" or (callable(get_head) and get_head() is module)


def _matches(name: str, module: nn.Module, spec: TargetSpec, model: nn.Module) -> bool:
    if spec == "all-linear":
        return isinstance(module, (nn.Linear, LoRALinear)) and not _is_head(name, module, model)
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def _linear_summary(model: nn.Module) -> str:
    """Linear module names with layer indices folded to '*', e.g. 'layers.*.self_attn.q_proj'."""
    names = {
        re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)", "*", n)
        for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, LoRALinear))
    }
    return ", ".join(sorted(names)) or "(none)"


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """Every LoRALinear in the model, with its dotted name."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def find_targets(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """The dotted names cfg would wrap; raises (and changes nothing) if the match is empty or invalid."""
    if not isinstance(cfg, LoRAConfig):
        raise TypeError(f"expected a LoRAConfig, got {type(cfg).__name__}")
    names = []
    for name, module in model.named_modules():
        if not name or not _matches(name, module, cfg.target_modules, model):
            continue
        if cfg.exclude_modules is not None and _matches(name, module, cfg.exclude_modules, model):
            continue
        if isinstance(module, LoRALinear):
            raise ValueError(
                f"{name!r} is already a LoRALinear: inject_lora ran twice on it. Inject once, "
                "or exclude it with exclude_modules"
            )
        if not isinstance(module, nn.Linear):
            raise ValueError(
                f"target_modules={cfg.target_modules!r} matched {name!r}, a {type(module).__name__}, "
                f"but LoRA wraps nn.Linear only. Linear modules in the model: {_linear_summary(model)}"
            )
        names.append(name)
    if not names:
        raise ValueError(
            f"target_modules={cfg.target_modules!r} (exclude_modules={cfg.exclude_modules!r}) matched "
            f"no module. Linear modules in the model: {_linear_summary(model)}"
        )
    return names


def _freeze(model: nn.Module, bias: str) -> None:
    """Only lora_A/lora_B train, plus biases as PEFT's bias="all" / "lora_only" define them."""
    trainable = set()
    for _, layer in lora_layers(model):
        trainable |= {id(layer.lora_A), id(layer.lora_B)}
        if bias == "lora_only" and layer.bias is not None:
            trainable.add(id(layer.bias))
    for name, p in model.named_parameters():
        p.requires_grad_(id(p) in trainable or (bias == "all" and name.rsplit(".", 1)[-1] == "bias"))


def inject_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Replace each matched nn.Linear by a LoRALinear sharing its weight/bias; freeze the rest.

    Returns the wrapped dotted names. The config is kept as `model.lora_config` for save_adapter; a
    second injection (into other modules) must use the same hyperparameters.
    """
    names = find_targets(model, cfg)
    previous = getattr(model, "lora_config", None)
    if previous is not None:
        same = ("rank", "alpha", "dropout", "use_rslora", "init", "bias")
        if any(getattr(previous, k) != getattr(cfg, k) for k in same):
            raise ValueError(
                f"the model already carries LoRA with {previous}; a second inject_lora must use the "
                f"same {', '.join(same)} (one adapter config per model, as in PEFT's file format)"
            )
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        layer = LoRALinear(
            base, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, use_rslora=cfg.use_rslora, init=cfg.init
        )
        layer.train(base.training)  # a model in eval mode stays there: no LoRA dropout at inference
        setattr(parent, child, layer)
    if previous is not None:  # record exactly what is wrapped now, so the saved config re-matches it
        cfg = dataclasses.replace(cfg, target_modules=sorted(n for n, _ in lora_layers(model)), exclude_modules=None)
    model.lora_config = cfg
    _freeze(model, cfg.bias)
    return names


def _check_not_tied(model: nn.Module, layers: list[tuple[str, LoRALinear]]) -> None:
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    for name, layer in layers:
        shared = [n for n in owners.get(id(layer.weight), []) if n != f"{name}.weight"]
        if shared:
            raise ValueError(
                f"{name}.weight is tied to {shared}; merging would change those too. "
                "Keep this adapter unmerged (or untie the weights first)"
            )


def merge_lora(model: nn.Module) -> list[str]:
    """Fold s B A into every LoRA layer's weight; refuses a model that is already merged."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRALinear layers to merge; call inject_lora first")
    merged = [n for n, m in layers if m.merged]
    if merged:
        raise RuntimeError(
            f"LoRA is already merged into {merged[:3]}...; merging twice would add B A twice. Call unmerge_lora first"
        )
    _check_not_tied(model, layers)
    done = []
    try:
        for name, layer in layers:  # noqa: B007 (name is read by the error below)
            layer.merge()
            done.append(layer)
    except ValueError as e:  # leave the model as it was
        for layer in done:
            layer.unmerge()
        raise ValueError(f"merging {name!r}: {e}") from None
    return [n for n, _ in layers]


def unmerge_lora(model: nn.Module) -> list[str]:
    """Subtract s B A from every merged LoRA layer again."""
    layers = lora_layers(model)
    unmerged = [n for n, m in layers if not m.merged]
    if not layers or unmerged:
        raise RuntimeError(f"unmerge_lora needs a merged model; not merged: {unmerged[:3] or 'no LoRA layers'}")
    for _, layer in layers:
        layer.unmerge()
    return [n for n, _ in layers]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) element counts, each shared (tied) parameter counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
