"""Adapters on disk in PEFT's layout: adapter_config.json + adapter_model.safetensors (never pickle).

File keys are `base_model.model.<module path>.lora_A.weight` / `.lora_B.weight` (PEFT drops the adapter
name), and with bias != "none" the trained biases: `<path>.base_layer.bias` for a wrapped layer,
`<path>.bias` for any other module, as PEFT writes them.
A model may say where its modules sit in the transformers model it was imported from with an
attribute `hf_module_prefix` (e.g. "model.decoder." for OPT): file keys then carry that prefix
(except `lm_head`, which transformers' *ForCausalLM keeps at the top), so plain PEFT loads the
adapter onto the transformers model, and load_adapter strips it again.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import LoRAConfig
from .inject import find_targets, inject_lora, lora_layers

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


def _injected_config(model: nn.Module) -> LoRAConfig:
    cfg = getattr(model, "lora_config", None)
    if cfg is None or not lora_layers(model):
        raise ValueError("the model has no LoRA adapter; call inject_lora (or load_adapter) first")
    return cfg


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under the model's own state-dict keys (`<path>.lora_A`, `<path>.lora_B`),
    plus the biases that train under the config's bias mode. model.load_state_dict(sd, strict=False) takes it."""
    cfg = _injected_config(model)
    sd = {}
    for name, layer in lora_layers(model):
        sd[f"{name}.lora_A"], sd[f"{name}.lora_B"] = layer.lora_A.detach(), layer.lora_B.detach()
        if cfg.bias == "lora_only" and layer.bias is not None:
            sd[f"{name}.bias"] = layer.bias.detach()
    if cfg.bias == "all":
        sd.update({n: p.detach() for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] == "bias"})
    return sd


def _hf_prefix(model: nn.Module) -> str:
    return getattr(model, "hf_module_prefix", "") or ""


def _to_file_key(key: str, lora_names: set[str], hf_prefix: str) -> str:
    path, _, leaf = key.rpartition(".")
    root = PREFIX + ("" if key.split(".", 1)[0] == "lm_head" else hf_prefix)
    if leaf in ("lora_A", "lora_B"):
        return f"{root}{path}.{leaf}.weight"
    return f"{root}{path}.base_layer.bias" if path in lora_names else root + key


def _from_file_key(key: str, hf_prefix: str) -> str:
    key = key.removeprefix(PREFIX)
    if hf_prefix:
        key = key.removeprefix(hf_prefix)
    for leaf in ("lora_A", "lora_B"):
        if key.endswith(f".{leaf}.weight"):
            return key.removesuffix(".weight")
    return key.replace(".base_layer.bias", ".bias")


def save_adapter(model: nn.Module, path: str | Path) -> None:
    """Write path/adapter_config.json and path/adapter_model.safetensors, readable by PEFT."""
    cfg = _injected_config(model)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    lora_names = {n for n, _ in lora_layers(model)}
    prefix = _hf_prefix(model)
    tensors = {
        _to_file_key(k, lora_names, prefix): v.contiguous().cpu().clone() for k, v in lora_state_dict(model).items()
    }
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "inference_mode": True,
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "use_rslora": cfg.use_rslora,
        "target_modules": cfg.target_modules,
        "exclude_modules": cfg.exclude_modules,
        "bias": cfg.bias,
        "init_lora_weights": True if cfg.init == "kaiming" else "gaussian",
        "fan_in_fan_out": False,
        "modules_to_save": None,
    }
    save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
    (path / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")


def _read_config(file: Path) -> LoRAConfig:
    try:
        raw = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
        raise ValueError(f"{file} is not a LoRA adapter config (peft_type must be 'LORA')")
    missing = [k for k in ("r", "lora_alpha", "target_modules") if raw.get(k) is None]
    if missing:
        raise ValueError(f"{file} lacks {missing}")
    if raw.get("fan_in_fan_out"):
        raise ValueError(f"{file} has fan_in_fan_out=true (Conv1D layout); only nn.Linear adapters load here")
    return LoRAConfig(
        rank=raw["r"],
        alpha=raw["lora_alpha"],
        dropout=raw.get("lora_dropout", 0.0),
        target_modules=raw["target_modules"],
        use_rslora=bool(raw.get("use_rslora", False)),
        init="gaussian" if raw.get("init_lora_weights") == "gaussian" else "kaiming",
        bias=raw.get("bias", "none"),
        exclude_modules=raw.get("exclude_modules"),
    )


def _expected_shapes(model: nn.Module, names: list[str], cfg: LoRAConfig) -> dict[str, tuple[int, ...]]:
    """State-dict key -> shape the adapter file must hold for it, for the modules `names` of `model`."""
    shapes = {}
    for name in names:
        m = model.get_submodule(name)
        shapes[f"{name}.lora_A"] = (cfg.rank, m.in_features)
        shapes[f"{name}.lora_B"] = (m.out_features, cfg.rank)
        if cfg.bias == "lora_only" and m.bias is not None:
            shapes[f"{name}.bias"] = tuple(m.bias.shape)
    if cfg.bias == "all":
        shapes.update({n: tuple(p.shape) for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] == "bias"})
    return shapes


def load_adapter(model: nn.Module, path: str | Path) -> list[str]:
    """Inject per the saved config (unless the model already carries that LoRA), then load the tensors.

    Everything is checked before the model is touched: files present and readable, targets found,
    every tensor present with the shape its module needs. Returns the LoRA module names.
    """
    path = Path(path)
    missing = [f for f in (CONFIG_NAME, WEIGHTS_NAME) if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{path} is not an adapter folder: missing {missing} (save_adapter writes {CONFIG_NAME} and {WEIGHTS_NAME})"
        )
    cfg = _read_config(path / CONFIG_NAME)
    try:
        raw = load_file(str(path / WEIGHTS_NAME))
    except Exception as e:  # safetensors raises its own error type for truncated / corrupt headers
        raise ValueError(f"{path / WEIGHTS_NAME} cannot be read as safetensors (truncated or corrupt?): {e}") from None
    tensors = {_from_file_key(k, _hf_prefix(model)): v for k, v in raw.items()}

    present = lora_layers(model)
    if present:
        if any(m.merged for _, m in present):
            raise RuntimeError("the model's LoRA is merged; unmerge_lora before loading an adapter")
        bad = [n for n, m in present if (m.rank, m.alpha, m.use_rslora) != (cfg.rank, cfg.alpha, cfg.use_rslora)]
        if bad:
            raise ValueError(
                f"the model already carries LoRA at {bad[:3]} with other rank/alpha than the adapter "
                f"(r={cfg.rank}, alpha={cfg.alpha}); load it into a fresh base model"
            )
        names = [n for n, _ in present]
    else:
        names = find_targets(model, cfg)
    expected = _expected_shapes(model, names, cfg)
    for key, shape in expected.items():
        if key not in tensors:
            raise ValueError(
                f"{path / WEIGHTS_NAME} has no tensor for {key!r}; the adapter was trained on other "
                "modules than this model's targets"
            )
        if tuple(tensors[key].shape) != shape:
            module = key.rpartition(".")[0]
            raise ValueError(
                f"adapter tensor {key!r} has shape {tuple(tensors[key].shape)} but module {module!r} "
                f"needs {shape}; the adapter was trained on a model of another size"
            )
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise ValueError(f"{path / WEIGHTS_NAME} holds tensors for modules this model does not target: {extra[:5]}")

    if not present:
        inject_lora(model, cfg)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, t in tensors.items():
            params[key].copy_(t)
    return names
