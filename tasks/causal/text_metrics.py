"""Scores of generated answers against references: exact match and ROUGE-L (rouge-score)."""

from __future__ import annotations

from collections.abc import Sequence

from rouge_score import rouge_scorer

_ROUGE_L = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the answer equals the reference after trimming outer whitespace."""
    return float(prediction.strip() == reference.strip())


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence of lower-cased word tokens)."""
    return float(_ROUGE_L.score(reference, prediction)["rougeL"].fmeasure)


SCORERS = {"exact_match": exact_match, "rouge_l": rouge_l}


def per_example(metric: str, predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """One score per (prediction, reference) pair; the pairs must line up."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    score = SCORERS[metric]
    return [score(p, r) for p, r in zip(predictions, references, strict=True)]


def generation_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean exact match and ROUGE-L over the pairs."""
    n = max(len(references), 1)
    return {name: sum(per_example(name, predictions, references)) / n for name in SCORERS}
