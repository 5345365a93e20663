"""Put LoRALinear into a model: matching target names, wrapping, freezing, merge/unmerge, counting.

Target names in a list resolve against the model before matching (`resolve_targets`), from one table:
- role names: `attention` (every attention projection), `mlp` (every MLP Linear), `all-linear` (every Linear but
  the output head); a role name means the role even where a module has that name (the Llama block's `mlp`);
- the seed's OPT names keep working on a Llama-family model, where they stand for its own modules:
  q_proj, k_proj, v_proj -> the same; out_proj -> o_proj; fc1 -> gate_proj + up_proj; fc2 -> down_proj.
Any other name is used as given. A name that matches nothing is refused before any module is touched, with a
did-you-mean and the Linear names the model has.
"""

from __future__ import annotations

import dataclasses
import difflib
import re

from torch import nn

from .config import LoRAConfig
from .layer import LoRALinear

TargetSpec = list[str] | str

# The one table of target names: each of the seed's OPT module names, its role, and the Llama-family modules it
# stands for on a model that has those instead.
TARGET_TABLE: dict[str, tuple[str, tuple[str, ...]]] = {
    "q_proj": ("attention", ("q_proj",)),
    "k_proj": ("attention", ("k_proj",)),
    "v_proj": ("attention", ("v_proj",)),
    "out_proj": ("attention", ("o_proj",)),
    "fc1": ("mlp", ("gate_proj", "up_proj")),
    "fc2": ("mlp", ("down_proj",)),
}
SEED_TARGETS = tuple(TARGET_TABLE)  # the seed's six names, valid on every base
ROLE_NAMES = ("attention", "mlp", "all-linear")


def _role_members(role: str) -> list[str]:
    """Leaf names of a role in either family, OPT's first: attention -> q, k, v, out_proj, o_proj."""
    opt = [name for name, (r, _) in TARGET_TABLE.items() if r == role]
    return opt + [m for name in opt for m in TARGET_TABLE[name][1] if m not in opt]


def _is_head(name: str, module: nn.Module, model: nn.Module) -> bool:
    """The output head, which "all-linear" leaves alone: `lm_head`, or what get_output_embeddings() returns."""
    get_head = getattr(model, "get_output_embeddings", None)
    return name.rsplit(".", 1)[-1] == "lm_head" or (callable(get_head) and get_head() is module)


def _matches(name: str, module: nn.Module, spec: TargetSpec, model: nn.Module) -> bool:
    if spec == "all-linear":
        return isinstance(module, (nn.Linear, LoRALinear)) and not _is_head(name, module, model)
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(_named(name, t) for t in spec)


def _named(name: str, target: str) -> bool:
    """PEFT's rule for a target name: the dotted name equals it or ends with "." + it (never `xq_proj`)."""
    return name == target or name.endswith("." + target)


def fold_names(names: list[str]) -> list[str]:
    """Dotted module names with layer indices folded to '*', sorted, without repeats:
    ['layers.0.self_attn.q_proj', 'layers.1.self_attn.q_proj'] -> ['layers.*.self_attn.q_proj']."""
    return sorted({re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)", "*", n) for n in names})


def _linear_summary(model: nn.Module) -> str:
    """Linear module names with layer indices folded to '*', e.g. 'layers.*.self_attn.q_proj'."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, LoRALinear))]
    return ", ".join(fold_names(names)) or "(none)"


def resolve_targets(model: nn.Module, names: list[str]) -> list[str]:
    """The module names `names` stand for on this model, in order, without repeats: a role name expands to the
    model's modules of that role, a seed OPT name the model lacks becomes its Llama-family equivalents, any other
    name stays. Raises ValueError for a name that matches no module, with a did-you-mean and the model's Linear
    names."""
    modules = [n for n, _ in model.named_modules() if n]
    has = lambda target: any(_named(n, target) for n in modules)
    resolved: list[str] = []
    unmatched: list[str] = []
    for name in names:
        if name == "all-linear":
            found = [
                n.rsplit(".", 1)[-1]
                for n, m in model.named_modules()
                if n and isinstance(m, (nn.Linear, LoRALinear)) and not _is_head(n, m, model)
            ]
        elif name in ROLE_NAMES:
            found = [m for m in _role_members(name) if has(m)]
        elif has(name) or name not in TARGET_TABLE:
            found = [name] if has(name) else []
        else:
            found = [m for m in TARGET_TABLE[name][1] if has(m)]
        if not found:
            unmatched.append(name)
        resolved += [f for f in dict.fromkeys(found) if f not in resolved]
    if unmatched:
        raise ValueError(
            f"target_modules={names!r}: {', '.join(map(repr, unmatched))} matched no module"
            f"{_did_you_mean(unmatched, modules)}. Linear modules in the model: {_linear_summary(model)}"
        )
    return resolved


def _did_you_mean(unmatched: list[str], modules: list[str]) -> str:
    """' (did you mean 'out_proj' for 'o_proj'?)': the model's own name for a Llama-family name of the table,
    else the closest of the model's leaf names and the role names (difflib), else nothing."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in modules})
    guesses = []
    for name in unmatched:
        seed = [opt for opt, (_, llama) in TARGET_TABLE.items() if name in llama and opt in leaves]
        close = seed or difflib.get_close_matches(name.lower(), [*leaves, *ROLE_NAMES], n=1, cutoff=0.6)
        if close:
            guesses.append(f"{close[0]!r} for {name!r}")
    return f" (did you mean {', '.join(guesses)}?)" if guesses else ""


def _resolved(model: nn.Module, cfg: LoRAConfig) -> LoRAConfig:
    """cfg with its list of target names resolved against the model (resolve_targets); a regex string or
    "all-linear" is PEFT's own spec and stays."""
    if not isinstance(cfg, LoRAConfig):
        raise TypeError(f"expected a LoRAConfig, got {type(cfg).__name__}")
    if isinstance(cfg.target_modules, str):
        return cfg
    return dataclasses.replace(cfg, target_modules=resolve_targets(model, cfg.target_modules))


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """Every LoRALinear in the model, with its dotted name."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def find_targets(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """The dotted names cfg would wrap; raises (and changes nothing) if a name or the whole match is empty, or
    a match is not an nn.Linear."""
    cfg = _resolved(model, cfg)
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

    Returns the wrapped dotted names. The config is kept as `model.lora_config` for save_adapter, its list of
    target names resolved (role and seed names replaced by the model's own: PEFT then reads the saved adapter on
    the transformers model of the same architecture); a second injection (into other modules) must use the same
    hyperparameters.
    """
    cfg = _resolved(model, cfg)
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
        layer = LoRALinear(base, cfg)
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
