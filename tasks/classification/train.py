"""train for classification: LoRA plus the new classification head, scored per epoch."""

from __future__ import annotations

import json

import numpy as np
from datasets import load_from_disk
from transformers import DataCollatorWithPadding

from tasks.classification.data import LABELS_FILE, label_names
from tasks.classification.metrics import classification_metrics
from tasks.classification.modeling import build_lora_model
from tasks.common.models import load_tokenizer
from tasks.common.stage import StageContext
from tasks.common.training import TrainingSetup, fit
from tasks.records import PreparedData, TrainedAdapter


def _compute_metrics(names):
    def compute(eval_pred):
        logits, labels = eval_pred
        return classification_metrics(labels, np.argmax(logits, axis=-1), names, per_class=False)

    return compute


def train(stage: StageContext, data: PreparedData) -> TrainedAdapter:
    """Fine-tune LoRA and the head on the training split; save and log the adapter."""
    config = stage.config
    names = label_names(stage, data)
    dataset = load_from_disk(str(stage.fetch(data.dataset) / "tokenized"))

    def build() -> TrainingSetup:
        tokenizer = load_tokenizer(config.model)
        model, report = build_lora_model(config.model, config.lora, names)
        return TrainingSetup(
            model=model,
            report=report,
            tokenizer=tokenizer,
            collator=DataCollatorWithPadding(tokenizer),
            compute_metrics=_compute_metrics(names),
            task_type="SEQ_CLS",
        )

    adapter_dir = stage.stage_dir("adapter")
    result = fit(stage, build, dataset, adapter_dir)
    (adapter_dir / LABELS_FILE).write_text(json.dumps(names))
    ref = stage.run.log_folder(adapter_dir, "adapter")
    return TrainedAdapter(adapter=ref, **result.__dict__)
