"""Adapters on disk, in PEFT's format: adapter_config.json + adapter_model.safetensors.

Keys are `base_model.model.` + the parameter's name in the user's model, which (thanks to the
PEFT attribute names in layers.py) is exactly what `peft.get_peft_model_state_dict` produces:

    base_model.model.<layer>.lora_A.weight / .lora_B.weight       Linear, Conv1D
    base_model.model.<layer>.lora_embedding_A / .lora_embedding_B  Embedding
    base_model.model.<module>.<param>                              modules_to_save
    base_model.model.<layer>.base_layer.bias                       bias="lora_only" (and "all")
    base_model.model.<anything>.bias                               bias="all"
    base_model.model.<embedding>.base_layer.weight                 when embed_tokens / lm_head is a
                                                                   target (PEFT saves it then)

Weights are read and written with safetensors only, never pickle.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import ALL_LINEAR, LoraConfig, LoraError
from .layers import LoraLayer
from .model import _within, get_lora_config, inject_lora, lora_layers, name_matches, unload_lora
from .peft_format import from_peft_fields, to_peft_fields

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
PEFT_EMBEDDING_NAMES = ("embed_tokens", "lm_head")  # peft.utils.constants.EMBEDDING_LAYER_NAMES
# peft.TaskType values, with the heads PEFT's task models save alongside the adapter
TASK_HEADS = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
    "CAUSAL_LM": (),
    "SEQ_2_SEQ_LM": (),
    "FEATURE_EXTRACTION": (),
}


# ---------------------------------------------------------------------------------------------
# state dict


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's on-disk key names (live tensors, detached)."""
    return _adapter_state_dict(model, get_lora_config(model))


def _adapter_state_dict(model: nn.Module, config: LoraConfig) -> dict[str, torch.Tensor]:
    full = model.state_dict()
    keys: list[str] = []
    for name, layer in lora_layers(model):
        keys += [f"{name}.{k}" for k in layer.lora_parameter_names()]
    if config.bias == "all":
        keys += [k for k in full if k == "bias" or k.endswith(".bias")]
    elif config.bias == "lora_only":
        keys += [
            f"{n}.base_layer.bias" for n, _ in lora_layers(model) if f"{n}.base_layer.bias" in full
        ]
    if config.modules_to_save:
        keys += [k for k in full if _within(k.rpartition(".")[0], config.modules_to_save)]
    keys += _peft_embedding_keys(model, config, full)
    return {PREFIX + k: full[k] for k in dict.fromkeys(keys)}


def _peft_embedding_keys(
    model: nn.Module, config: LoraConfig, full: dict[str, torch.Tensor]
) -> list[str]:
    """PEFT also saves the base weights of a targeted embed_tokens / lm_head layer; mirror that."""
    targets = config.target_modules
    if targets == ALL_LINEAR:
        return []
    names = [n for n, _ in lora_layers(model)]
    if isinstance(targets, str):
        targeted = any(
            re.fullmatch(targets, n) and re.match(rf"(.*\.)?({'|'.join(PEFT_EMBEDDING_NAMES)})$", n)
            for n in names
        )
    else:
        targeted = any(e in targets for e in PEFT_EMBEDDING_NAMES)
    if not targeted:
        return []
    keys = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            layer = getattr(model, getter)()
        except (AttributeError, NotImplementedError):
            continue
        if isinstance(layer, LoraLayer):
            name = next(n for n, m in model.named_modules() if m is layer)
            keys += [k for k in full if k.startswith(f"{name}.base_layer.")]
    return keys


# ---------------------------------------------------------------------------------------------
# config


def _peft_config_dict(
    model: nn.Module, config: LoraConfig, base_model_name_or_path: str, task_type: str | None
) -> dict:
    layers = lora_layers(model)
    targets = (
        sorted(n for n, _ in layers)
        if config.target_modules == ALL_LINEAR
        else config.target_modules
    )
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        **to_peft_fields(config),
        "target_modules": targets,
        "fan_in_fan_out": any(getattr(m, "fan_in_fan_out", False) for _, m in layers),
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
        "lora_bias": False,
        "layer_replication": None,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "loftq_config": {},
        "target_parameters": None,
        "trainable_token_indices": None,
    }


# PEFT options that change the model beyond plain LoRA; lora_core refuses rather than guess.
_UNSUPPORTED = {
    "use_dora": (False, None),
    "lora_bias": (False, None),
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
    "layers_to_transform": (None, []),
    "layers_pattern": (None, []),
    "layer_replication": (None,),
    "target_parameters": (None, []),
    "trainable_token_indices": (None,),
    "use_qalora": (False, None),
    "alora_invocation_tokens": (None,),
    "use_bdlora": (None, False),
    "arrow_config": (None,),
}


def read_adapter_config(adapter_dir: str | Path) -> LoraConfig:
    """Read PEFT's adapter_config.json into a LoraConfig (LoraError for non-plain-LoRA options)."""
    path = Path(adapter_dir) / CONFIG_NAME
    if not path.is_file():
        raise LoraError(
            f"no {CONFIG_NAME} in {Path(adapter_dir)}: expected a PEFT LoRA adapter folder "
            f"({CONFIG_NAME} + {WEIGHTS_NAME}), e.g. one written by save_adapter"
        )
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoraError(f"{path} is not valid JSON ({e}): re-save the adapter") from None
    if not isinstance(raw, dict):
        raise LoraError(
            f"{path} holds a {type(raw).__name__}, not a JSON object: re-save the adapter"
        )
    if raw.get("peft_type", "LORA") != "LORA":
        raise LoraError(
            f"{path} is a {raw['peft_type']} adapter, lora_core reads only LORA adapters"
        )
    for key, plain in _UNSUPPORTED.items():
        if key in raw and raw[key] not in plain:
            raise LoraError(
                f"{path} sets {key}={raw[key]!r}, which lora_core does not support (plain LoRA "
                "only)"
            )
    init = raw.get("init_lora_weights", True)
    if init not in (True, False, "gaussian"):  # False: "no init", moot once weights load
        raise LoraError(
            f"{path} sets init_lora_weights={init!r}: lora_core supports true (default) and "
            "'gaussian'"
        )
    try:
        return LoraConfig(**from_peft_fields(raw))
    except LoraError as e:
        raise LoraError(f"{path}: {e}") from None


# ---------------------------------------------------------------------------------------------
# save / load


def _adapter_config(model: nn.Module, task_type: str | None) -> LoraConfig:
    config = get_lora_config(model)
    if task_type is not None and task_type not in TASK_HEADS:
        raise LoraError(f"task_type must be one of {sorted(TASK_HEADS)} or None, got {task_type!r}")
    saved = list(config.modules_to_save or [])
    names = [n for n, _ in model.named_modules() if n]
    saved += [
        h for h in TASK_HEADS.get(task_type, ()) if h not in saved and name_matches_any(names, h)
    ]
    return replace(config, modules_to_save=saved or None)


def adapter_tensors(model: nn.Module, task_type: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors save_adapter writes (PEFT key names), full and on the CPU.

    A sharded parameter (a DTensor of FSDP2) is gathered: with a sharded model every rank must
    call this, and one of them passes the result to save_adapter(tensors=...).
    """
    tensors = _adapter_state_dict(model, _adapter_config(model, task_type))
    full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in tensors.items()}
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in full.items()}


def save_adapter(
    model: nn.Module,
    out_dir: str | Path,
    *,
    base_model_name_or_path: str,
    task_type: str | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write adapter_config.json + adapter_model.safetensors (peft.PeftModel can load them).

    As PEFT does, task types with a task head (SEQ_CLS/TOKEN_CLS: classifier or score,
    QUESTION_ANS: qa_outputs) store that head with the adapter (added to modules_to_save): a
    freshly loaded base model would otherwise get a new random head. `tensors`: what
    adapter_tensors(model, task_type) returned (a sharded model's, gathered on every rank).
    """
    config = _adapter_config(model, task_type)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tensors is None:
        tensors = adapter_tensors(model, task_type)
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    cfg = _peft_config_dict(model, config, base_model_name_or_path, task_type)
    (out / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return out


def name_matches_any(names: list[str], entry: str) -> bool:
    return any(name_matches(n, [entry]) for n in names)


def _read_weights(adapter_dir: Path) -> dict[str, torch.Tensor]:
    path = adapter_dir / WEIGHTS_NAME
    if not path.is_file():
        extra = (
            " (found adapter_model.bin, a pickle file lora_core will not load: re-save it as "
            "safetensors)"
            if (adapter_dir / "adapter_model.bin").exists()
            else ""
        )
        raise LoraError(
            f"no {WEIGHTS_NAME} in {adapter_dir}{extra}: expected a PEFT LoRA adapter folder "
            f"({CONFIG_NAME} + {WEIGHTS_NAME}), e.g. one written by save_adapter"
        )
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LoraError(
            f"could not read {path} ({e}): the file is corrupt or not safetensors, "
            "re-save the adapter"
        ) from None


def _peft_only_key(key: str, config: LoraConfig) -> bool:
    """Keys PEFT writes for its own wrapper internals (bias='all' + modules_to_save) that carry
    nothing lora_core needs: the modules_to_save copy is already under the plain name."""
    parts = key.split(".")
    for marker in ("modules_to_save", "original_module"):
        if marker in parts:
            owner = ".".join(parts[: parts.index(marker)])
            if config.modules_to_save and _within(owner, config.modules_to_save):
                return True
    return False


def load_adapter(
    model: nn.Module, adapter_dir: str | Path, *, is_trainable: bool = False
) -> LoraConfig:
    """Inject LoRA per the adapter's config and load its weights (strict: every key must fit).

    is_trainable=False freezes everything and puts the model in eval mode (inference, like
    PEFT). On any error the model is restored to how it was and LoraError says what is wrong.
    """
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    weights = _read_weights(adapter_dir)
    if config.modules_to_save:  # PEFT lists task heads that may not exist (e.g. "score" in BERT)
        names = [n for n, _ in model.named_modules() if n]
        kept = [m for m in config.modules_to_save if name_matches_any(names, m)]
        config = replace(config, modules_to_save=kept or None)
    requires_grad = {id(p): p.requires_grad for p in model.parameters()}
    inject_lora(model, config)
    try:
        _load_weights(model, weights, adapter_dir / WEIGHTS_NAME, config)
    except Exception:
        unload_lora(model, merge=False)
        for p in model.parameters():
            p.requires_grad_(requires_grad.get(id(p), p.requires_grad))
        raise
    if not is_trainable:
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
    return config


def _load_weights(
    model: nn.Module, weights: dict[str, torch.Tensor], path: Path, config: LoraConfig
) -> None:
    """Check keys and shapes of all tensors first, then copy them in (so errors change nothing)."""
    expected = lora_state_dict(model)
    optional = {PREFIX + k for k in _peft_embedding_keys(model, config, model.state_dict())}
    weights = {
        k: v
        for k, v in sorted(weights.items())
        if not _peft_only_key(k.removeprefix(PREFIX), config)
    }
    unexpected = [k for k in weights if k not in expected]
    missing = [k for k in expected if k not in weights and k not in optional]
    if unexpected or missing:
        parts = [
            f"{what} keys: {_some(keys)}"
            for what, keys in (("missing", missing), ("unexpected", unexpected))
            if keys
        ]
        raise LoraError(
            f"{path} does not fit the model ({'; '.join(parts)}): adapter for a different base "
            "model or LoRA config?"
        )
    for key, tensor in weights.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise LoraError(
                f"adapter for a different base model? {key} has shape {tuple(tensor.shape)} in the "
                f"adapter but {tuple(expected[key].shape)} in the model"
            )
    with torch.no_grad():
        for key, tensor in weights.items():
            expected[key].copy_(tensor)


def _some(keys: list[str], n: int = 10) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")
