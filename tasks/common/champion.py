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


def _bootstrap(metric: str, delta_on, n: int, samples: int, confidence: float, seed: int):
    """delta_on(indices) for all n examples and for `samples` resamples with replacement."""
    rng = np.random.default_rng(seed)
    deltas = np.array([delta_on(rng.integers(0, n, n)) for _ in range(samples)])
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(deltas, [tail, 100 - tail])
    return Comparison(
        metric=metric,
        delta=float(delta_on(np.arange(n))),
        low=float(low),
        high=float(high),
        confidence=confidence,
    )


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
    """Classification: resample test examples (same rows for both models) `samples` times."""
    y, c, p = (np.asarray(a, dtype=np.int64) for a in (y_true, candidate, production))

    def delta_on(idx):
        return metric_value(metric, y[idx], c[idx], num_classes) - metric_value(
            metric, y[idx], p[idx], num_classes
        )

    return _bootstrap(metric, delta_on, len(y), samples, confidence, seed)


def paired_bootstrap_scores(
    metric: str,
    candidate: Sequence[float],
    production: Sequence[float],
    samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Comparison:
    """Per-example scores (e.g. ROUGE-L per prompt): the mean difference, resampled."""
    c, p = np.asarray(candidate, dtype=np.float64), np.asarray(production, dtype=np.float64)
    if c.shape != p.shape or not len(c):
        raise ValueError(f"{len(c)} candidate scores vs {len(p)} production scores")
    return _bootstrap(
        metric, lambda idx: float(np.mean(c[idx] - p[idx])), len(c), samples, confidence, seed
    )
