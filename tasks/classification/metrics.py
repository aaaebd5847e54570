"""Classification metrics and the confusion-matrix plot."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import (
    ConfusionMatrixDisplay,
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)

from tasks.common.plots import plt


def classification_metrics(
    y_true: Sequence[int], y_pred: Sequence[int], label_names: Sequence[str], per_class: bool = True
) -> dict[str, float]:
    """Accuracy, macro-F1 and (optionally) per-class precision/recall/F1, keyed by label name."""
    labels = list(range(len(label_names)))
    metrics = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(
            f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)
        ),
    }
    if per_class:
        precision, recall, f1, support = precision_recall_fscore_support(
            y_true, y_pred, labels=labels, zero_division=0
        )
        for i, name in enumerate(label_names):
            metrics[f"precision.{name}"] = float(precision[i])
            metrics[f"recall.{name}"] = float(recall[i])
            metrics[f"f1.{name}"] = float(f1[i])
            metrics[f"support.{name}"] = float(support[i])
    return metrics


def label_ids(names: Sequence[str], label_names: Sequence[str]) -> list[int]:
    """Label names as ids; a name outside label_names is -1 (wrong for every class)."""
    ids = {name: i for i, name in enumerate(label_names)}
    return [ids.get(name, -1) for name in names]


def confusion_matrix_figure(
    y_true: Sequence[int], y_pred: Sequence[int], label_names: Sequence[str], title: str
):
    """A matplotlib figure of the confusion matrix (rows: true label, columns: predicted)."""
    matrix = confusion_matrix(y_true, y_pred, labels=list(range(len(label_names))))
    fig, ax = plt.subplots(figsize=(1.2 * len(label_names) + 2.5, 1.0 * len(label_names) + 2))
    ConfusionMatrixDisplay(matrix, display_labels=list(label_names)).plot(
        ax=ax, cmap="Blues", colorbar=False, xticks_rotation=45
    )
    ax.set_title(title)
    fig.tight_layout()
    return fig


def argmax(logits: np.ndarray) -> np.ndarray:
    return np.asarray(logits).argmax(axis=-1)
