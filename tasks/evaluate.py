"""Stage 3: score the adapter model on the test split, and the current production model too."""

from __future__ import annotations

from dataclasses import dataclass, field

import mlflow
import pandas as pd
from datasets import load_from_disk
from mlflow.tracking import MlflowClient

from tasks.config import PipelineConfig
from tasks.metrics import argmax, classification_metrics, confusion_matrix_figure, save_figure
from tasks.modeling import load_adapted_model, load_tokenizer, predict_logits
from tasks.prepare_data import PreparedData
from tasks.registry import PRODUCTION, version_by_alias
from tasks.stage import stage_task
from tasks.storage import stage_dir
from tasks.tracking import connect, log_folder, log_metrics, stage_timer
from tasks.train_lora import TrainedAdapter


@dataclass(frozen=True)
class Evaluation:
    """Test-split metrics of the candidate (adapter model) and of production, if any.

    Classification keeps the labels and production's predictions; causal_lm keeps production's
    per-prompt scores (registry.metric) for the paired champion comparison.
    """

    metrics: dict[str, float]
    production_metrics: dict[str, float] | None
    production_version: str | None
    labels: list[int] = field(default_factory=list)
    production_predictions: list[int] | None = None
    production_scores: list[float] | None = None


def load_test_split(data: PreparedData):
    return load_from_disk(str(data.dataset.fetch() / "tokenized"))["test"]


def score_production(config: PipelineConfig, texts, y_true, label_names):
    """Metrics of the model behind models:/NAME@production on these texts (None if none)."""
    version = version_by_alias(MlflowClient(), config.registry.model_name, PRODUCTION)
    if version is None:
        return None, None, None
    served = mlflow.pyfunc.load_model(f"models:/{config.registry.model_name}@{PRODUCTION}")
    predicted = served.predict(pd.DataFrame({"text": list(texts)}))["label"]
    ids = {name: i for i, name in enumerate(label_names)}
    y_pred = [ids.get(label, -1) for label in predicted]  # a label we don't know is wrong
    return str(version.version), classification_metrics(y_true, y_pred, label_names), y_pred


def evaluate(
    config: PipelineConfig, data: PreparedData, trained: TrainedAdapter, run_id: str
) -> Evaluation:
    """Accuracy, macro-F1, per-class scores and confusion matrices, logged to the run."""
    if config.task == "causal_lm":
        from tasks.causal.evaluate import evaluate_causal  # imported here: it imports this module

        return evaluate_causal(config, data, trained, run_id)
    connect(config.tracking)
    with stage_timer(run_id, "evaluate"):
        test = load_test_split(data)
        tokenizer = load_tokenizer(config.model)
        model = load_adapted_model(config.model, trained.adapter.fetch(), data.label_names)
        logits = predict_logits(
            model, tokenizer, test["text"], config.data.max_length, config.eval.batch_size
        )
        y_true, y_pred = test["labels"], argmax(logits)
        metrics = classification_metrics(y_true, y_pred, data.label_names)
        log_metrics(run_id, {f"test.{k}": v for k, v in metrics.items()})

        out_dir = stage_dir(config, run_id, "evaluation")
        save_figure(
            confusion_matrix_figure(
                y_true, y_pred, data.label_names, "Candidate (adapter) on test"
            ),
            out_dir / "confusion_matrix.png",
        )
        names = data.label_names
        table = pd.DataFrame(
            {
                "text": test["text"],
                "label": [names[i] for i in y_true],
                "predicted": [names[i] for i in y_pred],
            }
        )
        version, prod_metrics, prod_pred = score_production(config, test["text"], y_true, names)
        if prod_metrics is not None:
            log_metrics(run_id, {f"production.{k}": v for k, v in prod_metrics.items()})
            table["production_predicted"] = [names[i] if i >= 0 else "?" for i in prod_pred]
            save_figure(
                confusion_matrix_figure(
                    y_true, prod_pred, names, f"Production (v{version}) on test"
                ),
                out_dir / "confusion_matrix_production.png",
            )
        table.to_csv(out_dir / "test_predictions.csv", index=False)
        log_folder(run_id, out_dir, "evaluation")
    return Evaluation(
        metrics=metrics,
        production_metrics=prod_metrics,
        production_version=version,
        labels=[int(y) for y in y_true],
        production_predictions=None if prod_pred is None else [int(p) for p in prod_pred],
    )


evaluate_task = stage_task(evaluate, name="evaluate", retries=2)
