"""LoRA hyper-parameters (`LoraConfig`) and the one error type users see (`LoraError`).

Validation happens once, in `LoraConfig.__post_init__`, so every later stage (injection, saving,
loading) can trust the values. Messages name the field, the bad value and how to fix it.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

ALL_LINEAR = "all-linear"
INITS = ("default", "gaussian")
BIASES = ("none", "lora_only", "all")


class LoraError(ValueError):
    """Every user-facing lora_core error: bad config, bad target, bad or mismatched adapter file."""


@dataclass
class LoraConfig:
    """What to adapt and how. Field names follow the LoRA paper; `alpha` is PEFT's `lora_alpha`."""

    r: int = 8
    """Rank of the update B @ A; 4-16 is typical. Must be <= min(in, out) of every target."""
    alpha: float = 16
    """Scale numerator: the update is multiplied by alpha / r (alpha / sqrt(r) with use_rslora)."""
    dropout: float = 0.0
    """Dropout probability applied to the LoRA branch input only (0 disables it at no cost)."""
    target_modules: list[str] | str = ("query", "value")
    """Layers to adapt: names (full name or '.'-suffix), a regex (re.fullmatch) or 'all-linear'."""
    exclude_modules: list[str] | str | None = None
    """Layers never to adapt, same matching rules as target_modules."""
    modules_to_save: list[str] | None = None
    """Whole modules (e.g. ['classifier']) trained fully and stored with the adapter."""
    use_rslora: bool = False
    """Rank-stabilised LoRA: scale by alpha / sqrt(r) instead of alpha / r."""
    init: str = "default"
    """'default': A Kaiming-uniform (a=sqrt(5)), B = 0; 'gaussian': A ~ N(0, 1/r), B = 0 (PEFT)."""
    bias: str = "none"
    """Which biases train: 'none', 'lora_only' (biases of adapted layers) or 'all' (every bias)."""

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise LoraError(
                f"lora.r must be a positive integer, got {self.r!r}: set r to 1 or more (8 and 16 "
                "are common)"
            )
        if (
            isinstance(self.alpha, bool)
            or not isinstance(self.alpha, (int, float))
            or not 0 < self.alpha < math.inf
        ):
            raise LoraError(
                f"lora.alpha must be a positive number, got {self.alpha!r}: set alpha to e.g. 16 "
                "(often 2 * r)"
            )
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, (int, float))
            or not 0 <= self.dropout < 1
        ):
            raise LoraError(
                f"lora.dropout must be a number in [0, 1), got {self.dropout!r}: use 0.0 (off) or "
                "e.g. 0.05"
            )
        self.target_modules = _check_patterns("target_modules", self.target_modules)
        if self.exclude_modules is not None:
            self.exclude_modules = _check_patterns("exclude_modules", self.exclude_modules)
            if self.exclude_modules == ALL_LINEAR:
                raise LoraError(
                    "lora.exclude_modules cannot be 'all-linear': name the layers to skip"
                )
        if self.modules_to_save is not None:
            mts = self.modules_to_save
            if isinstance(mts, str) or not all(isinstance(m, str) and m for m in mts):
                raise LoraError(
                    f"lora.modules_to_save must be a list of module names, got {mts!r}: e.g. "
                    "['classifier']"
                )
            self.modules_to_save = list(mts) or None  # [] and None both mean none
        if not isinstance(self.use_rslora, bool):
            raise LoraError(f"lora.use_rslora must be true or false, got {self.use_rslora!r}")
        if self.init not in INITS:
            raise LoraError(
                f"lora.init must be one of {list(INITS)}, got {self.init!r}: use 'default' unless "
                "unsure"
            )
        if self.bias not in BIASES:
            raise LoraError(
                f"lora.bias must be one of {list(BIASES)}, got {self.bias!r}: use 'none' unless "
                "unsure"
            )

    @property
    def scaling(self) -> float:
        """The factor the LoRA branch is multiplied by."""
        return self.alpha / (self.r**0.5 if self.use_rslora else self.r)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_patterns(name: str, value: Any) -> list[str] | str:
    """Normalise a target/exclude spec to a list of names or a compiled-checked regex string."""
    if isinstance(value, str):
        if not value:
            raise LoraError(
                f"lora.{name} is an empty string: give layer names, a regex or 'all-linear'"
            )
        if value != ALL_LINEAR:
            try:
                re.compile(value)
            except re.error as e:
                raise LoraError(
                    f"lora.{name} {value!r} is not a valid regex ({e}): fix the pattern"
                ) from None
        return value
    if (
        isinstance(value, (list, tuple, set, frozenset))
        and value
        and all(isinstance(v, str) and v for v in value)
    ):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    raise LoraError(
        f"lora.{name} must be a non-empty list of layer names or a regex string, got {value!r}: "
        "e.g. ['query', 'value'] or 'all-linear'"
    )


__all__ = ["ALL_LINEAR", "LoraConfig", "LoraError"]
