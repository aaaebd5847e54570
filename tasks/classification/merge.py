"""merge for classification: a plain transformers classifier folder with its tokenizer."""

from __future__ import annotations

from functools import partial

from tasks.classification.data import label_names, load_split
from tasks.classification.modeling import load_adapted_model, load_classifier, predict_logits
from tasks.common.merging import merge_checked
from tasks.common.models import load_tokenizer
from tasks.common.onnx import max_abs_diff
from tasks.common.stage import StageContext
from tasks.records import MergedModel, PreparedData, TrainedAdapter


def merge(stage: StageContext, data: PreparedData, trained: TrainedAdapter) -> MergedModel:
    """Merge safely, save, reload the saved folder and gate on logits parity with the adapter."""
    config = stage.config
    names = label_names(stage, data)
    texts = load_split(stage, data, "test")["text"]
    tokenizer = load_tokenizer(config.model)

    def save(model, folder):
        model.save_pretrained(str(folder), safe_serialization=True)
        tokenizer.save_pretrained(str(folder))

    ref, gate = merge_checked(
        stage,
        load_adapted_model(config.model, stage.fetch(trained.adapter), names),
        outputs=partial(
            predict_logits,
            tokenizer=tokenizer,
            texts=texts,
            max_length=config.data.max_length,
            batch_size=config.eval.batch_size,
        ),
        difference=max_abs_diff,
        save=save,
        reload=lambda folder: load_classifier(str(folder), names),
    )
    return MergedModel(model=ref, parity=gate)
