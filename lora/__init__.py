"""LoRA by hand: the layer, injection into a model, and adapters on disk in PEFT's layout."""

from .adapter import load_adapter, lora_state_dict, save_adapter
from .config import LoRAConfig
from .inject import count_parameters, inject_lora, merge_lora, unmerge_lora
from .layer import LoRALinear

__all__ = [
    "LoRAConfig",
    "LoRALinear",
    "inject_lora",
    "merge_lora",
    "unmerge_lora",
    "lora_state_dict",
    "save_adapter",
    "load_adapter",
    "count_parameters",
]
