"""Loading decoder models (Llama, Qwen, Mistral, GPT-2, ...) and attaching LoRA to them."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from lora_core import LoraError, inject_lora, load_adapter
from tasks.config import LoraSection, ModelConfig
from tasks.errors import ModelError
from tasks.modeling import lora_config, resolve_model_path


def load_causal_lm(source: str, trust_remote_code: bool = False, dtype=torch.float32):
    """A causal LM from a folder or hub id, safetensors only, in `dtype` (fp32: master weights)."""
    try:
        return AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"cannot load a causal LM from {source!r}: {exc} (task causal_lm needs a decoder "
            f"such as Llama, Qwen, Mistral or GPT-2)"
        ) from exc


def build_causal_lora_model(model_cfg: ModelConfig, lora: LoraSection):
    """Base decoder with LoRA injected, ready to train; returns (model, InjectionReport).

    The KV cache is off for training: with it on, transformers ignores the restarting
    position ids of packed rows and lets tokens attend across examples.
    """
    model = load_causal_lm(resolve_model_path(model_cfg.name_or_path), model_cfg.trust_remote_code)
    model.config.use_cache = False
    try:
        report = inject_lora(model, lora_config(lora))
    except LoraError as exc:
        raise ModelError(str(exc)) from exc
    return model, report


def load_adapted_causal_lm(model_cfg: ModelConfig, adapter_dir: Path):
    """Base decoder plus a saved adapter, in eval mode with the KV cache on (for generation)."""
    model = load_causal_lm(resolve_model_path(model_cfg.name_or_path), model_cfg.trust_remote_code)
    try:
        load_adapter(model, adapter_dir)
    except LoraError as exc:
        raise ModelError(str(exc)) from exc
    model.config.use_cache = True
    return model.eval()


def load_base_causal_lm(model_cfg: ModelConfig):
    """The base decoder without LoRA, in eval mode (evaluated beside the candidate)."""
    path = resolve_model_path(model_cfg.name_or_path)
    return load_causal_lm(path, model_cfg.trust_remote_code).eval()


def open_causal_onnx(folder: Path, file_name: str, device: str = "cpu", num_threads: int = 0):
    """optimum's ORTModelForCausalLM (KV cache) on one ONNX file of an exported folder; asking
    for cuda and not getting the CUDA provider is an error, as for classifiers."""
    import onnxruntime as ort  # imported here: GPU training workers never load onnxruntime
    from optimum.onnxruntime import ORTModelForCausalLM

    from tasks.onnx_runtime import CUDA, providers_for

    options = ort.SessionOptions()
    options.intra_op_num_threads = num_threads
    options.inter_op_num_threads = 1
    provider = providers_for(device)[0]
    model = ORTModelForCausalLM.from_pretrained(
        str(folder),
        file_name=file_name,
        provider=provider,
        session_options=options,
        use_io_binding=provider == CUDA,
    )
    if device == "cuda" and model.providers[0] != CUDA:
        raise ModelError(
            f"serve.device is cuda but onnxruntime runs {file_name} on {model.providers}: "
            f"install onnxruntime-gpu with a matching CUDA, or set serve.device to cpu"
        )
    return model
