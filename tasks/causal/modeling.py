"""Decoder models (Llama, Qwen, Mistral, GPT-2, ...): loading them, attaching LoRA, ONNX runs."""

from __future__ import annotations

from pathlib import Path

import torch
from optimum.onnxruntime import ORTModelForCausalLM
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from tasks.common.config import LoraSection, ModelConfig
from tasks.common.errors import ConfigError, ModelError
from tasks.common.models import (
    base_model_config,
    check_max_length,
    is_decoder,
    resolve_model_path,
    training_attention,
    with_adapter,
    with_lora,
)
from tasks.common.onnx import CUDA, providers_for, require_provider, session_options


def check_base_model(model_cfg: ModelConfig, max_length: int) -> None:
    """Refuse, before any work, a base model that has no causal-LM head in transformers."""
    model_config = base_model_config(model_cfg)
    trained_as = ", ".join(model_config.architectures or ()) or "no architectures"
    encoder = bool(model_config.architectures) and not is_decoder(model_config)
    if model_config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or (
        encoder and not model_config.is_decoder  # BERT has an LM head, but sees both ways
    ):
        raise ConfigError(
            f"model.name_or_path {model_cfg.name_or_path!r} is a {model_config.model_type!r} "
            f"model without a causal-LM head ({trained_as}): task causal_lm needs a decoder "
            f"such as Llama, Qwen, Mistral or GPT-2; set task: sequence_classification for an "
            f"encoder"
        )
    check_max_length(model_cfg, max_length, model_config)


def load_causal_lm(
    source: str, trust_remote_code: bool = False, dtype=torch.float32, **options: str
):
    """A causal LM from a folder or hub id, safetensors only, in `dtype` (fp32: master
    weights); `options`: more from_pretrained arguments (training_attention's)."""
    try:
        return AutoModelForCausalLM.from_pretrained(
            source,
            dtype=dtype,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            **options,
        )
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise ModelError(
            f"cannot load a causal LM from {source!r}: {type(exc).__name__}: {exc} (task "
            f"causal_lm needs a decoder such as Llama, Qwen, Mistral or GPT-2)"
        ) from exc


def build_causal_lora_model(
    model_cfg: ModelConfig, lora: LoraSection, device: str = "cpu", precision: str = "fp32"
):
    """Base decoder with LoRA injected, ready to train on `device` in `precision`; returns
    (model, InjectionReport).

    The KV cache is off for training: with it on, transformers ignores the restarting
    position ids of packed rows and lets tokens attend across examples.
    """
    model = load_causal_lm(
        resolve_model_path(model_cfg.name_or_path),
        model_cfg.trust_remote_code,
        **training_attention(model_cfg, device, precision),
    )
    model.config.use_cache = False
    return with_lora(model, lora)


def load_adapted_causal_lm(model_cfg: ModelConfig, adapter_dir: Path):
    """Base decoder plus a saved adapter, in eval mode with the KV cache on (for generation)."""
    model = load_causal_lm(resolve_model_path(model_cfg.name_or_path), model_cfg.trust_remote_code)
    model = with_adapter(model, adapter_dir)
    model.config.use_cache = True
    return model


def load_base_causal_lm(model_cfg: ModelConfig):
    """The base decoder without LoRA, in eval mode (evaluated beside the candidate)."""
    path = resolve_model_path(model_cfg.name_or_path)
    return load_causal_lm(path, model_cfg.trust_remote_code).eval()


def open_causal_onnx(folder: Path, file_name: str, device: str = "cpu", num_threads: int = 0):
    """optimum's ORTModelForCausalLM (KV cache) on one ONNX file of an exported folder; asking
    for cuda and not getting the CUDA provider is an error, as for classifiers."""
    options = session_options(num_threads, device)
    provider = providers_for(device)[0]
    model = ORTModelForCausalLM.from_pretrained(
        str(folder),
        file_name=file_name,
        provider=provider,
        session_options=options,
        use_io_binding=provider == CUDA,
    )
    require_provider(device, model.providers, file_name)
    return model
