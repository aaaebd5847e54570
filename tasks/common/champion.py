"""Champion comparison: a paired bootstrap confidence interval of a metric difference.

Both models answered the same examples; each resample draws the examples (with replacement)
once for both. Resamples are computed as arrays, a chunk at a time, so registry's largest
bootstrap_samples (100,000) takes seconds and bounded memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

CHUNK_ELEMENTS = 2_000_000  # resampled example indices held at once (16 MB of int64)


@dataclass(frozen=True)
class Comparison:
    """Candidate minus production on the same examples, with a bootstrap interval. (For one
    model's own score, from bootstrap_metric / bootstrap_mean, `delta` is that score.)"""

    metric: str
    delta: float
    low: float
    high: float
    confidence: float


def _macro_f1(y: np.ndarray, p: np.ndarray, k: int) -> np.ndarray:
    """Macro-F1 of each row of (rows, n) label ids; a prediction of -1 (a label the model
    does not know) is wrong for every class."""
    rows = np.arange(y.shape[0])[:, None]
    p = np.where(p < 0, k, p)
    hit = y == p
    tp = np.bincount((rows * k + y)[hit], minlength=len(y) * k).reshape(-1, k)
    predicted = np.bincount((rows * (k + 1) + p).ravel(), minlength=len(y) * (k + 1))
    predicted = predicted.reshape(-1, k + 1)[:, :k]
    actual = np.bincount((rows * k + y).ravel(), minlength=len(y) * k).reshape(-1, k)
    denom = predicted + actual
    f1 = np.divide(2 * tp, denom, out=np.zeros(denom.shape), where=denom > 0)
    return f1.mean(axis=1)


def metric_rows(name: str, y: np.ndarray, p: np.ndarray, k: int) -> np.ndarray:
    """accuracy or macro_f1 of each row."""
    if name == "accuracy":
        return (y == p).mean(axis=1)
    return _macro_f1(y, p, k)


def _bootstrap(
    metric: str,
    delta_rows: Callable[[np.ndarray], np.ndarray],
    n: int,
    samples: int,
    confidence: float,
    seed: int,
) -> Comparison:
    """delta_rows(indices (rows, n)) on all n examples, and on `samples` resamples."""
    rng = np.random.default_rng(seed)
    chunk = max(1, CHUNK_ELEMENTS // max(n, 1))
    deltas = np.concatenate(
        [
            delta_rows(rng.integers(0, n, (min(chunk, samples - start), n)))
            for start in range(0, samples, chunk)
        ]
    )
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(deltas, [tail, 100 - tail])
    return Comparison(
        metric=metric,
        delta=float(delta_rows(np.arange(n)[None, :])[0]),
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
    """Classification: the metric recomputed on each resample of the test examples."""
    y, c, p = (np.asarray(a, dtype=np.int64) for a in (y_true, candidate, production))

    def delta_rows(idx: np.ndarray) -> np.ndarray:
        yi = y[idx]
        return metric_rows(metric, yi, c[idx], num_classes) - metric_rows(
            metric, yi, p[idx], num_classes
        )

    return _bootstrap(metric, delta_rows, len(y), samples, confidence, seed)


def bootstrap_metric(
    metric: str,
    y_true: Sequence[int],
    predicted: Sequence[int],
    num_classes: int,
    samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Comparison:
    """Classification: one model's metric on the test examples and its bootstrap interval."""
    y, p = (np.asarray(a, dtype=np.int64) for a in (y_true, predicted))
    return _bootstrap(
        metric,
        lambda idx: metric_rows(metric, y[idx], p[idx], num_classes),
        len(y),
        samples,
        confidence,
        seed,
    )


def bootstrap_mean(
    metric: str, scores: Sequence[float], samples: int = 1000, confidence: float = 0.95, seed=0
) -> Comparison:
    """Per-example scores (e.g. ROUGE-L per prompt): their mean and its bootstrap interval."""
    s = np.asarray(scores, dtype=np.float64)
    return _bootstrap(metric, lambda idx: s[idx].mean(axis=1), len(s), samples, confidence, seed)


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
    difference = c - p
    return _bootstrap(
        metric, lambda idx: difference[idx].mean(axis=1), len(c), samples, confidence, seed
    )
