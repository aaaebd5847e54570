"""train for classification: LoRA plus the new classification head, scored per epoch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from transformers import DataCollatorWithPadding

from tasks.classification.data import LABELS_FILE
from tasks.classification.metrics import classification_metrics
from tasks.classification.modeling import build_lora_model, first_token_last_layer
from tasks.common.config import PipelineConfig
from tasks.common.models import load_tokenizer
from tasks.common.training import TrainingSetup, pad_multiple, pick_device, pick_precision


def _compute_metrics(names):
    def compute(eval_pred):
        logits, labels = eval_pred
        return classification_metrics(labels, np.argmax(logits, axis=-1), names, per_class=False)

    return compute


def training_setup(config: PipelineConfig, data_dir: Path) -> TrainingSetup:
    """LoRA and the head for the class names prepare_data saved in data_dir."""
    names = json.loads((data_dir / LABELS_FILE).read_text())
    tokenizer = load_tokenizer(config.model)
    device = pick_device(config.train)
    precision = pick_precision(config.train, device)
    model, report = build_lora_model(config.model, config.lora, names, device, precision)
    first_token_last_layer(model)  # the same gradients, fewer rows in the last layer
    return TrainingSetup(
        model=model,
        report=report,
        tokenizer=tokenizer,
        collator=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_multiple(precision)),
        compute_metrics=_compute_metrics(names),
        task_type="SEQ_CLS",
        files={LABELS_FILE: json.dumps(names)},
    )


def search_objective(config: PipelineConfig) -> tuple[str, str]:
    """registry.metric (accuracy or macro-F1) on the validation split, higher is better."""
    return config.registry.metric, "maximize"
