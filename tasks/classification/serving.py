"""How a classifier is registered and served: its pyfunc, signature, serving.json, checks."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema
from mlflow.types.schema import Map

from tasks.classification.data import label_names, load_split
from tasks.classification.metrics import label_ids
from tasks.classification.onnx_text_classifier import OnnxTextClassifier
from tasks.common.champion import Comparison, bootstrap_metric, paired_bootstrap
from tasks.common.serving import pinned
from tasks.common.stage import StageContext
from tasks.records import Evaluation, GoldenSet, PreparedData, ServeReport

SERVING_CODE = Path(__file__).resolve().parent / "onnx_text_classifier.py"
REQUIREMENTS = ["onnxruntime", "transformers", "tokenizers", "numpy", "pandas"]


def signature(config) -> tuple[ModelSignature, pd.DataFrame, list[str]]:
    """The pyfunc's signature, input example and pip requirements."""
    signature = ModelSignature(
        inputs=Schema([ColSpec("string", "text")]),
        outputs=Schema(
            [
                ColSpec("string", "label"),
                ColSpec("double", "score"),
                ColSpec(Map("double"), "probabilities"),
            ]
        ),
    )
    return signature, pd.DataFrame({"text": ["my card was charged twice"]}), pinned(REQUIREMENTS)


def serving_spec(stage: StageContext, data: PreparedData) -> dict:
    """What the pyfunc needs beyond the ONNX file: labels, and the batching the gates measured
    (dynamic int8 scales depend on the batch)."""
    config = stage.config
    return {
        "label_names": label_names(stage, data),
        "max_length": config.data.max_length,
        "batch_size": config.eval.batch_size,
    }


def _probabilities_sum_to_one(answer: dict) -> bool:
    return abs(sum(answer["probabilities"].values()) - 1.0) < 1e-4


def golden_set(
    stage: StageContext, data: PreparedData, served: ServeReport, serving_dir: Path
) -> GoldenSet:
    """The first serve.golden_requests test texts, and the labels the served pyfunc gives them
    in this process (one request, batched as the server will: dynamic int8 scales depend on
    the batch, so answers are compared request for request)."""
    texts = list(load_split(stage, data, "test")["text"])[: stage.config.serve.golden_requests]
    in_process = OnnxTextClassifier.from_folder(serving_dir)
    expected = in_process.predict(None, pd.DataFrame({"text": texts}))["label"]
    return GoldenSet(
        records=[{"text": t} for t in texts],
        expected=[str(label) for label in expected],
        answer_key="label",
        well_formed=_probabilities_sum_to_one,
    )


def compare(
    stage: StageContext, data: PreparedData, served: ServeReport, evaluation: Evaluation
) -> Comparison | None:
    """Paired bootstrap of the served candidate minus production (registry.metric)."""
    if evaluation.production_answers is None or evaluation.production_refusal is not None:
        return None
    registry, names = stage.config.registry, label_names(stage, data)
    return paired_bootstrap(
        registry.metric,
        label_ids(served.references, names),
        label_ids(served.answers, names),
        label_ids(evaluation.production_answers, names),
        len(names),
        registry.bootstrap_samples,
        registry.confidence,
    )


def interval(stage: StageContext, data: PreparedData, served: ServeReport) -> Comparison:
    """The served model's registry.metric on the test split, with a bootstrap interval."""
    registry, names = stage.config.registry, label_names(stage, data)
    return bootstrap_metric(
        registry.metric,
        label_ids(served.references, names),
        label_ids(served.answers, names),
        len(names),
        registry.bootstrap_samples,
        registry.confidence,
    )


def summary(served: ServeReport) -> str:
    """One line of the served model's scores and speed against PyTorch."""
    m, t = served.metrics, served.timings
    return (
        f"accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f}; batch-1 p50 "
        f"{t['serve/onnx.batch1_p50_ms']:.2f} ms (PyTorch {t['serve/torch.batch1_p50_ms']:.2f} ms)"
    )
