"""evaluate for classification: the adapter model and production on the test split."""

from __future__ import annotations

import mlflow
import pandas as pd

from tasks.classification.data import label_names, load_split
from tasks.classification.metrics import (
    argmax,
    classification_metrics,
    confusion_matrix_figure,
    label_ids,
)
from tasks.classification.modeling import load_adapted_model, predict_logits
from tasks.common.models import load_tokenizer
from tasks.common.plots import save_figure
from tasks.common.registry import PRODUCTION, production_version
from tasks.common.stage import StageContext
from tasks.records import Evaluation, PreparedData, TrainedAdapter

TASK = "sequence_classification"


def production_answers(stage: StageContext, texts, names: list[str]):
    """(version, predicted label names, why it cannot be compared) of models:/NAME@production
    on texts; Nones without a production model."""
    name = stage.config.registry.model_name
    version = production_version(stage.run.client, name, TASK)
    if version is None:
        return None, None, None
    with stage.run.tracking.fluent():
        served = mlflow.pyfunc.load_model(f"models:/{name}@{PRODUCTION}")
    predicted = served.predict(pd.DataFrame({"text": list(texts)}))["label"]
    held = [str(label) for label in served.unwrap_python_model().labels]
    refusal = None
    if set(held) != set(names):
        refusal = (
            f"production v{version.version} predicts the labels {sorted(held)} but this data has "
            f"{sorted(names)}; a champion comparison needs the same label set: fix the labels, "
            f"or promote the new version by hand (promote --force) if the classes changed on "
            f"purpose"
        )
    return str(version.version), [str(label) for label in predicted], refusal


def evaluate(stage: StageContext, data: PreparedData, trained: TrainedAdapter) -> Evaluation:
    """Accuracy, macro-F1, per-class scores and confusion matrices, logged to the run."""
    config, run = stage.config, stage.run
    names = label_names(stage, data)
    test = load_split(stage, data, "test")
    tokenizer = load_tokenizer(config.model)
    model = load_adapted_model(config.model, stage.fetch(trained.adapter), names)
    logits = predict_logits(
        model, tokenizer, test["text"], config.data.max_length, config.eval.batch_size
    )
    y_true, y_pred = test["labels"], argmax(logits)
    metrics = classification_metrics(y_true, y_pred, names)
    run.log_metrics({f"test/{k}": v for k, v in metrics.items()})

    out_dir = stage.stage_dir("evaluation")
    save_figure(
        confusion_matrix_figure(y_true, y_pred, names, "Candidate (adapter) on test"),
        out_dir / "confusion_matrix.png",
    )
    table = pd.DataFrame(
        {
            "text": test["text"],
            "label": [names[i] for i in y_true],
            "predicted": [names[i] for i in y_pred],
        }
    )
    version, answers, refusal = production_answers(stage, test["text"], names)
    prod_metrics = None
    if answers is not None:
        prod_pred = label_ids(answers, names)
        prod_metrics = classification_metrics(y_true, prod_pred, names)
        run.log_metrics({f"production/{k}": v for k, v in prod_metrics.items()})
        table["production_predicted"] = [
            a if i >= 0 else "?" for a, i in zip(answers, prod_pred, strict=True)
        ]
        save_figure(
            confusion_matrix_figure(y_true, prod_pred, names, f"Production (v{version}) on test"),
            out_dir / "confusion_matrix_production.png",
        )
    table.to_csv(out_dir / "test_predictions.csv", index=False)
    run.log_folder(out_dir, "evaluation")
    return Evaluation(
        metrics=metrics,
        production_version=version,
        production_metrics=prod_metrics,
        production_answers=answers,
        production_refusal=refusal,
    )
