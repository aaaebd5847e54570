"""Sequence classifiers: loading them with a head per label, and batched logits in either engine.

PyTorch and onnxruntime batch texts the same way as the served model does (the served pyfunc's
length_grouped: at most eval.batch_size texts of similar length, each batch padded to its
longest text): dynamic int8 scales depend on the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from safetensors import SafetensorError
from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerBase

from tasks.classification.onnx_text_classifier import length_grouped
from tasks.common.config import LoraSection, ModelConfig
from tasks.common.console import expected
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

# transformers' notice when the weights it had to initialize are the classification head only
NEW_HEAD_ONLY = r"newly initialized: \[('(pre_classifier|classifier|score)\.[^']*'(, )?)+\]"


def check_base_model(model_cfg: ModelConfig, max_length: int) -> None:
    """Refuse, before any work, a base model this task cannot fine-tune or serve.

    Limit: decoders (Llama, GPT-2, ...) are not supported as classifiers here; their ONNX export
    and padding differ. Fine-tune them with task: causal_lm.
    """
    model_config = base_model_config(model_cfg)
    if is_decoder(model_config):
        raise ConfigError(
            f"model.name_or_path {model_cfg.name_or_path!r} is a decoder "
            f"({', '.join(model_config.architectures)}): task sequence_classification needs an "
            f"encoder such as BERT or MiniLM; set task: causal_lm to fine-tune a decoder"
        )
    check_max_length(model_cfg, max_length, model_config)


def load_classifier(
    source: str, label_names: Sequence[str], trust_remote_code: bool = False, **options: str
):
    """A sequence classifier with one output per label (new head if the source has none:
    transformers' notice that only the head is "newly initialized" is what we ask for, so it
    is not shown; other new weights still are). `options`: more from_pretrained arguments
    (training_attention's)."""
    try:
        with expected("transformers.modeling_utils", NEW_HEAD_ONLY):
            model = AutoModelForSequenceClassification.from_pretrained(
                source,
                num_labels=len(label_names),
                id2label=dict(enumerate(label_names)),
                label2id={name: i for i, name in enumerate(label_names)},
                use_safetensors=True,
                trust_remote_code=trust_remote_code,
                ignore_mismatched_sizes=False,
                **options,
            )
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise ModelError(
            f"cannot load model weights from {source!r}: {type(exc).__name__}: {exc}; the "
            f"folder needs complete *.safetensors weights (save_pretrained writes them)"
        ) from exc
    return model


def build_lora_model(
    model_cfg: ModelConfig,
    lora: LoraSection,
    label_names: Sequence[str],
    device: str = "cpu",
    precision: str = "fp32",
):
    """Base classifier with LoRA injected, to train on `device` in `precision`; returns
    (model, InjectionReport)."""
    torch.manual_seed(0)  # the new head's init is reproducible
    model = load_classifier(
        resolve_model_path(model_cfg.name_or_path),
        label_names,
        model_cfg.trust_remote_code,
        **training_attention(model_cfg, device, precision),
    )
    return with_lora(model, lora)


# Classifiers whose head reads token 0 of the last hidden states only (a pooler, or features[:,
# 0]) and whose layers apply attention, then `attention.output(context, residual)`, then the MLP.
FIRST_TOKEN_HEADS = (
    "BertForSequenceClassification",
    "RobertaForSequenceClassification",
    "XLMRobertaForSequenceClassification",
    "CamembertForSequenceClassification",
    "ElectraForSequenceClassification",
)


def first_token_last_layer(model: torch.nn.Module) -> bool:
    """Have the last encoder layer compute, after its attention, token 0's row only: the
    output projection, residual, norms and MLP of the other tokens feed nothing the head reads
    (the export's graph does the same: tasks/common/first_token.py). The logits and every
    gradient stay the same; the layer's rows after attention drop from tokens to texts.
    Returns whether the model has that shape (else it is left as it is)."""
    if type(model).__name__ not in FIRST_TOKEN_HEADS:
        return False
    base = getattr(model, model.base_model_prefix, None)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    output = getattr(getattr(layers[-1], "attention", None), "output", None) if layers else None
    if output is None:
        return False

    def token_zero(_module, args):  # contiguous: F.linear on a strided slice runs as a bmm
        context, residual, *rest = args
        return (context[:, :1].contiguous(), residual[:, :1].contiguous(), *rest)

    output.register_forward_pre_hook(token_zero)
    return True


def load_adapted_model(model_cfg: ModelConfig, adapter_dir: Path, label_names: Sequence[str]):
    """Base classifier plus a saved adapter (LoRA weights and trained head), in eval mode."""
    model = load_classifier(
        resolve_model_path(model_cfg.name_or_path), label_names, model_cfg.trust_remote_code
    )
    return with_adapter(model, adapter_dir)


def in_order(batches, run, count: int) -> np.ndarray:
    """run(arrays) on each (positions, arrays) batch, the rows put back in the texts' order."""
    out = np.zeros((0, 0), dtype=np.float32)
    for positions, arrays in batches:
        logits = run(arrays)
        if not out.size:
            out = np.zeros((count, logits.shape[-1]), dtype=logits.dtype)
        out[positions] = logits
    return out


@torch.inference_mode()
def predict_logits(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    max_length: int,
    batch_size: int = 64,
) -> np.ndarray:
    """fp32 logits of a PyTorch classifier for texts, batched as the served model batches."""
    model.eval()
    device = next(model.parameters()).device

    def run(arrays):
        batch = {k: torch.from_numpy(v).to(device) for k, v in arrays.items()}
        return model(**batch).logits.float().cpu().numpy()

    batches = length_grouped(tokenizer, list(texts), max_length, batch_size)
    return in_order(batches, run, len(texts))


def session_feed(session: ort.InferenceSession, batch) -> dict[str, np.ndarray]:
    """The tokenizer's arrays the ONNX graph takes, as int64."""
    wanted = {i.name for i in session.get_inputs()}
    return {k: v.astype(np.int64) for k, v in batch.items() if k in wanted}


def session_logits(
    session: ort.InferenceSession,
    tokenizer,
    texts: Sequence[str],
    max_length: int,
    batch_size: int = 64,
) -> np.ndarray:
    """Logits of an ONNX classifier for texts, batched exactly like the PyTorch path."""

    def run(arrays):
        return session.run(["logits"], session_feed(session, arrays))[0]

    return in_order(length_grouped(tokenizer, list(texts), max_length, batch_size), run, len(texts))
