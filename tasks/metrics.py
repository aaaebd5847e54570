"""Classification metrics and the confusion-matrix plot, shared by the stages that score models."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import (  # noqa: E402
    ConfusionMatrixDisplay,
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)


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


def timing_figure(timings: dict[str, float], sizes: list[int], variant: str):
    """Two panels: batch-1 latency percentiles and throughput per batch size, both engines."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.38
    labels = {"onnx": f"onnxruntime ({variant})", "torch": "PyTorch fp32 eager"}
    for i, engine in enumerate(("onnx", "torch")):
        pct = [timings[f"serve.{engine}.batch1_{p}_ms"] for p in ("p50", "p95", "p99")]
        left.bar(np.arange(3) + i * width, pct, width, label=labels[engine])
        tput = [timings[f"serve.{engine}.batch{s}_per_second"] for s in sizes]
        right.bar(np.arange(len(sizes)) + i * width, tput, width, label=labels[engine])
    left.set_xticks(np.arange(3) + width / 2, ["p50", "p95", "p99"])
    left.set_ylabel("batch-1 latency (ms, model only)")
    right.set_xticks(np.arange(len(sizes)) + width / 2, [f"batch {s}" for s in sizes])
    right.set_ylabel("examples / second (model only)")
    left.legend()
    fig.tight_layout()
    return fig


def decoder_timing_figure(timings: dict[str, float], variant: str):
    """Two panels for decoders: time to first token percentiles and decode tokens/s, per engine."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.38
    labels = {"onnx": f"onnxruntime ({variant})", "torch": "PyTorch fp32 eager"}
    for i, engine in enumerate(("onnx", "torch")):
        pct = [timings[f"serve.{engine}.ttft_{p}_ms"] for p in ("p50", "p95", "p99")]
        left.bar(np.arange(3) + i * width, pct, width, label=labels[engine])
        right.bar([i], [timings[f"serve.{engine}.tokens_per_second"]], 0.6, label=labels[engine])
    left.set_xticks(np.arange(3) + width / 2, ["p50", "p95", "p99"])
    left.set_ylabel("time to first token (ms, batch 1)")
    right.set_xticks([0, 1], ["onnxruntime", "PyTorch"])
    right.set_ylabel("decode tokens / second (batch 1)")
    left.legend()
    fig.tight_layout()
    return fig


def save_figure(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def argmax(logits: np.ndarray) -> np.ndarray:
    return np.asarray(logits).argmax(axis=-1)
