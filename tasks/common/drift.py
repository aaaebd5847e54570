"""Drift statistics: two-sample tests comparing the data a model was trained on with new data.

A data watch retrains only when new data differs from the reference: label shares (chi-square),
text lengths (Kolmogorov-Smirnov) or embeddings (kernel MMD with a permutation p-value). Each
test returns a DriftTest record whose verdict is `p_value < alpha`. Pure numpy + scipy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import stats

_PERMUTATION_BLOCK = 128  # permutations scored per matrix product (bounds memory at N x 128)
_TIES = 1e-12  # a permuted MMD^2 this close below the observed one counts as a tie (rounding)


@dataclass(frozen=True)
class DriftTest:
    """One two-sample test: its name, statistic, p-value, the alpha it is judged at and whether
    it found drift (p_value < alpha)."""

    name: str
    statistic: float
    p_value: float
    alpha: float
    drifted: bool
    detail: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict:
        """A JSON-able copy of the record."""
        return asdict(self)


def _check_alpha(alpha: float) -> float:
    """alpha as a float in (0, 1), else ValueError."""
    alpha = float(alpha)
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    return alpha


def _verdict(
    name: str, statistic: float, p_value: float, alpha: float, detail: dict[str, Any]
) -> DriftTest:
    """Build the record; drift means p_value < alpha."""
    p_value = float(min(max(p_value, 0.0), 1.0))
    return DriftTest(name, float(statistic), p_value, alpha, bool(p_value < alpha), detail)


def _no_test(name: str, alpha: float, reason: str, detail: dict[str, Any]) -> DriftTest:
    """The record of a test that could not run: statistic 0, p-value 1, no drift."""
    return _verdict(name, 0.0, 1.0, alpha, {**detail, "reason": reason})


def _counts(counts: Mapping[str, int], side: str) -> dict[str, int]:
    """Label counts as ints; negative or non-integer counts raise ValueError."""
    out: dict[str, int] = {}
    for label, value in counts.items():
        number = float(value)
        if not np.isfinite(number) or number < 0 or number != int(number):
            raise ValueError(f"{side} count of label {label!r} must be a non-negative integer")
        out[label] = int(number)
    return out


def label_balance_test(
    reference: Mapping[str, int], current: Mapping[str, int], alpha: float
) -> DriftTest:
    """Chi-square test of homogeneity of label counts on the 2 x K table (no Yates correction).

    Labels seen on one side only are kept (a new label is a shift); labels 0 on both sides dropped.
    """
    alpha = _check_alpha(alpha)
    ref, cur = _counts(reference, "reference"), _counts(current, "current")
    labels = [
        label for label in dict.fromkeys([*ref, *cur]) if ref.get(label, 0) + cur.get(label, 0)
    ]
    n_ref = sum(ref.get(label, 0) for label in labels)
    n_cur = sum(cur.get(label, 0) for label in labels)
    detail: dict[str, Any] = {
        "labels": [str(label) for label in labels],
        "reference_count": {str(k): ref.get(k, 0) for k in labels},
        "current_count": {str(k): cur.get(k, 0) for k in labels},
        "reference_share": {str(k): ref.get(k, 0) / n_ref if n_ref else 0.0 for k in labels},
        "current_share": {str(k): cur.get(k, 0) / n_cur if n_cur else 0.0 for k in labels},
        "new_labels": [str(k) for k in labels if ref.get(k, 0) == 0],
        "missing_labels": [str(k) for k in labels if cur.get(k, 0) == 0],
        "n_reference": n_ref,
        "n_current": n_cur,
    }
    if n_ref == 0 or n_cur == 0:
        return _no_test("label_balance", alpha, "a side has no rows", detail)
    if len(labels) < 2:
        return _no_test("label_balance", alpha, "fewer than 2 labels with rows", detail)
    table = np.array([[ref.get(k, 0) for k in labels], [cur.get(k, 0) for k in labels]])
    result = stats.chi2_contingency(table, correction=False)
    detail["dof"] = int(result.dof)
    return _verdict("label_balance", result.statistic, result.pvalue, alpha, detail)


def _lengths(values: Sequence[float] | np.ndarray, side: str) -> np.ndarray:
    """Lengths as a flat float array; non-finite values raise ValueError."""
    array = np.asarray(values, dtype=float).ravel()
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{side} lengths must be finite")
    return array


def length_test(
    reference: Sequence[float] | np.ndarray, current: Sequence[float] | np.ndarray, alpha: float
) -> DriftTest:
    """Two-sample Kolmogorov-Smirnov test on text lengths (characters)."""
    alpha = _check_alpha(alpha)
    ref, cur = _lengths(reference, "reference"), _lengths(current, "current")
    detail: dict[str, Any] = {"n_reference": int(ref.size), "n_current": int(cur.size)}
    if ref.size == 0 or cur.size == 0:
        return _no_test("text_length", alpha, "a side has no rows", detail)
    detail.update(
        mean_reference=float(ref.mean()),
        mean_current=float(cur.mean()),
        median_reference=float(np.median(ref)),
        median_current=float(np.median(cur)),
    )
    result = stats.ks_2samp(ref, cur)
    return _verdict("text_length", result.statistic, result.pvalue, alpha, detail)


def _rows(values: np.ndarray, side: str) -> np.ndarray:
    """Embeddings as an n x d float array (a flat array is n x 1); bad input raises ValueError."""
    array = np.asarray(values, dtype=float)
    if array.ndim == 1:
        array = array.reshape(-1, 1)
    if array.ndim != 2:
        raise ValueError(f"{side} embeddings must be an n x d array, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{side} embeddings must be finite")
    return array


def _subsample(rows: np.ndarray, max_samples: int, rng: np.random.Generator) -> np.ndarray:
    """At most max_samples rows, drawn without replacement."""
    if len(rows) <= max_samples:
        return rows
    return rows[np.sort(rng.choice(len(rows), size=max_samples, replace=False))]


def _rbf_kernel(pooled: np.ndarray) -> tuple[np.ndarray, float]:
    """Gaussian kernel matrix of the pooled rows and its bandwidth (median pairwise distance)."""
    norms = np.einsum("ij,ij->i", pooled, pooled)
    squared = np.maximum(norms[:, None] + norms[None, :] - 2.0 * (pooled @ pooled.T), 0.0)
    np.fill_diagonal(squared, 0.0)
    bandwidth = float(np.median(np.sqrt(squared[np.triu_indices(len(pooled), k=1)])))
    if not bandwidth > 0.0:
        bandwidth = 1.0
    return np.exp(-squared / (2.0 * bandwidth**2)), bandwidth


def _mmd2_unbiased(kernel: np.ndarray, in_x: np.ndarray, m: int) -> np.ndarray:
    """Unbiased MMD^2 for each column of in_x (N x P, 1.0 marks the m rows of the first sample).

    The kernel's diagonal is 1 (RBF), so the within-sample sums drop m and n for the diagonal.
    """
    n = len(kernel) - m
    kx = kernel @ in_x
    ky = kernel.sum(axis=1)[:, None] - kx
    sum_xx = np.einsum("ij,ij->j", in_x, kx)
    sum_xy = np.einsum("ij,ij->j", in_x, ky)
    sum_yy = np.einsum("ij,ij->j", 1.0 - in_x, ky)
    return (sum_xx - m) / (m * (m - 1)) + (sum_yy - n) / (n * (n - 1)) - 2.0 * sum_xy / (m * n)


def mmd_test(
    reference: np.ndarray,
    current: np.ndarray,
    alpha: float,
    permutations: int = 500,
    seed: int = 0,
    max_samples: int = 512,
) -> DriftTest:
    """Kernel two-sample test: unbiased MMD^2 with an RBF kernel (median-heuristic bandwidth),
    p-value from `permutations` seeded label permutations of the pooled sample."""
    alpha = _check_alpha(alpha)
    if permutations < 1 or max_samples < 2:
        raise ValueError("permutations must be >= 1 and max_samples >= 2")
    ref, cur = _rows(reference, "reference"), _rows(current, "current")
    if ref.shape[1] != cur.shape[1]:
        raise ValueError(f"embedding widths differ: {ref.shape[1]} vs {cur.shape[1]}")
    rng = np.random.default_rng(seed)
    ref, cur = _subsample(ref, max_samples, rng), _subsample(cur, max_samples, rng)
    m, n = len(ref), len(cur)
    detail: dict[str, Any] = {"n_reference": m, "n_current": n, "permutations": int(permutations)}
    if m < 2 or n < 2:
        return _no_test("embedding_mmd", alpha, "a side has fewer than 2 rows", detail)
    kernel, detail["bandwidth"] = _rbf_kernel(np.vstack([ref, cur]))
    base = np.concatenate([np.ones(m), np.zeros(n)])
    observed = float(_mmd2_unbiased(kernel, base[:, None], m)[0])
    shuffled = rng.permuted(np.tile(base, (permutations, 1)), axis=1)
    exceed = 0
    for start in range(0, permutations, _PERMUTATION_BLOCK):
        block = shuffled[start : start + _PERMUTATION_BLOCK].T
        exceed += int(np.count_nonzero(_mmd2_unbiased(kernel, block, m) >= observed - _TIES))
    p_value = (1 + exceed) / (1 + permutations)
    return _verdict("embedding_mmd", observed, p_value, alpha, detail)
