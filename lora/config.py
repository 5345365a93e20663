"""LoRAConfig: the hyperparameters of one adapter, validated when it is built."""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field

INITS = ("kaiming", "gaussian")
BIAS_MODES = ("none", "all", "lora_only")


def _check_targets(value: object, what: str, allow_empty: bool) -> None:
    """A target spec is a regex string (or "all-linear") or a non-empty list of module names."""
    if isinstance(value, str):
        if not value:
            raise ValueError(f"{what} is an empty string; give module names, a regex, or 'all-linear'")
        if value != "all-linear":
            try:
                re.compile(value)
            except re.error as e:
                raise ValueError(f"{what}={value!r} is not a valid regex: {e}") from None
        return
    if not isinstance(value, (list, tuple)):
        raise TypeError(
            f"{what} must be a list of module names, a regex string or 'all-linear', got {type(value).__name__}"
        )
    if not value and not allow_empty:
        raise ValueError(f"{what} is empty; name at least one module (e.g. ['q_proj', 'v_proj']) or use 'all-linear'")
    for name in value:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{what} must hold non-empty strings, got {name!r}")


@dataclass
class LoRAConfig:
    """rank r, alpha, dropout on the LoRA input, which Linear modules to wrap, and how.

    target_modules / exclude_modules: a list of names (a name matches a module whose dotted name equals
    it or ends with "." + name), a string that must full-match the dotted name (regex), or "all-linear"
    (every nn.Linear except the output head `lm_head`). These are PEFT's rules, so the saved config means
    the same thing to PEFT.
    bias: "none" (all biases frozen), "all" (every bias trainable), "lora_only" (biases of wrapped layers).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    use_rslora: bool = False
    init: str = "kaiming"
    bias: str = "none"
    exclude_modules: list[str] | str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, numbers.Integral):
            raise TypeError(f"rank must be an int, got {self.rank!r} ({type(self.rank).__name__})")
        if self.rank <= 0:
            raise ValueError(f"rank must be > 0, got {self.rank}")
        self.rank = int(self.rank)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, numbers.Real) or not math.isfinite(self.alpha):
            raise TypeError(f"alpha must be a finite number, got {self.alpha!r}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        self.alpha = float(self.alpha)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, numbers.Real):
            raise TypeError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        self.dropout = float(self.dropout)
        _check_targets(self.target_modules, "target_modules", allow_empty=False)
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if self.exclude_modules is not None:
            _check_targets(self.exclude_modules, "exclude_modules", allow_empty=True)
            if isinstance(self.exclude_modules, tuple):
                self.exclude_modules = list(self.exclude_modules)
        if not isinstance(self.use_rslora, bool):
            raise TypeError(f"use_rslora must be a bool, got {self.use_rslora!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"bias must be one of {BIAS_MODES}, got {self.bias!r}")

    @property
    def scaling(self) -> float:
        """alpha / r, or alpha / sqrt(r) with rsLoRA (keeps the update's scale stable as r grows)."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)
