"""The one translation between LoraConfig and PEFT's LoraConfig / adapter_config.json fields.

lora_core's names follow the LoRA paper; PEFT prefixes some (`lora_alpha`) and spells the
init differently (`init_lora_weights=True` is lora_core's "default"). io.py writes and reads
adapter files with these two functions, and the tests and benchmarks build `peft.LoraConfig`
from `to_peft_fields`.
"""

from __future__ import annotations

from typing import Any

from .config import LoraConfig

# lora_core field -> PEFT field, and the value PEFT assumes when a file leaves the field out
PEFT_FIELDS = {
    "r": ("r", 8),
    "alpha": ("lora_alpha", 8),
    "dropout": ("lora_dropout", 0.0),
    "target_modules": ("target_modules", None),
    "exclude_modules": ("exclude_modules", None),
    "modules_to_save": ("modules_to_save", None),
    "use_rslora": ("use_rslora", False),
    "init": ("init_lora_weights", True),
    "bias": ("bias", "none"),
}


def to_peft_fields(config: LoraConfig) -> dict[str, Any]:
    """config's values under PEFT's names (integral alpha as an int, as PEFT writes it)."""
    values = {peft: getattr(config, ours) for ours, (peft, _) in PEFT_FIELDS.items()}
    alpha = float(config.alpha)
    values["lora_alpha"] = int(alpha) if alpha.is_integer() else config.alpha
    values["init_lora_weights"] = True if config.init == "default" else config.init
    return values


def from_peft_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """LoraConfig keyword arguments from PEFT-named values (PEFT's defaults where absent)."""
    values = {ours: raw.get(peft, default) for ours, (peft, default) in PEFT_FIELDS.items()}
    init = values["init"]
    values["init"] = "default" if init is True or init is False else init  # False: weights load
    values["exclude_modules"] = values["exclude_modules"] or None
    values["modules_to_save"] = values["modules_to_save"] or None
    return values
