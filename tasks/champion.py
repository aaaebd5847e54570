"""Champion comparison: paired bootstrap confidence interval of a metric difference."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def _macro_f1(y: np.ndarray, p: np.ndarray, k: int) -> float:
    """Macro-F1 over k classes (a prediction of -1, an unknown label, is wrong for every class)."""
    p = np.where(p < 0, k, p)
    tp = np.bincount(y[y == p], minlength=k + 1)[:k]
    denom = np.bincount(p, minlength=k + 1)[:k] + np.bincount(y, minlength=k)[:k]
    f1 = np.divide(2 * tp, denom, out=np.zeros(k), where=denom > 0)
    return float(f1.mean())


def metric_value(name: str, y: np.ndarray, p: np.ndarray, k: int) -> float:
    if name == "accuracy":
        return float(np.mean(y == p))
    return _macro_f1(y, p, k)


@dataclass(frozen=True)
class Comparison:
    """Candidate minus production on the same examples, with a bootstrap interval."""

    metric: str
    delta: float
    low: float
    high: float
    confidence: float


def paired_bootstrap(
    metric: str,
    y_true: Sequence[int],
    candidate: Sequence[int],
    production: Sequence[int],
    num_classes: int,
    samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Comparison:
    """Resample test examples with replacement (same rows for both models) `samples` times."""
    y, c, p = (np.asarray(a, dtype=np.int64) for a in (y_true, candidate, production))
    delta = metric_value(metric, y, c, num_classes) - metric_value(metric, y, p, num_classes)
    rng = np.random.default_rng(seed)
    deltas = np.empty(samples)
    for i in range(samples):
        idx = rng.integers(0, len(y), len(y))
        deltas[i] = metric_value(metric, y[idx], c[idx], num_classes) - metric_value(
            metric, y[idx], p[idx], num_classes
        )
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(deltas, [tail, 100 - tail])
    return Comparison(
        metric=metric, delta=delta, low=float(low), high=float(high), confidence=confidence
    )
