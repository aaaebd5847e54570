"""The quantize stage for every task kind: build variants, score each against fp32, pick one.

CPU targets try the configured int8 variants (dynamic or static, per-channel or per-tensor)
with the kernels that fit this CPU; a GPU target (serve.device cuda) tries fp16. A variant
ships only when it passes its gates and answers faster than fp32 at batch 1; otherwise fp32
ships and the reason is recorded. What "score" and "gates" mean is the task kind's: it hands
in a VariantScorer.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from tasks.common.errors import GateFailed
from tasks.common.gates import Gate, evaluate_gate
from tasks.common.onnx import (
    ONNX_FILE,
    SERVED_FILE,
    convert_fp16,
    copy_missing_files,
    instruction_set,
    quantize_variant,
)
from tasks.common.tracking import ArtifactRef, TrackedRun


@dataclass(frozen=True)
class Candidate:
    """One variant: its scores on the test split, batch-1 latency, size and gates.

    scores holds the kind's figures (accuracy and top1_agreement for classification,
    perplexity and token_agreement for causal_lm); p50_ms is the kind's latency figure.
    """

    name: str
    model_file: str
    scores: dict[str, float]
    p50_ms: float
    size_mb: float
    gates: list[Gate] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    def figures(self, latency_name: str) -> dict[str, float]:
        """Every figure by its metric name: the scores, latency and size."""
        return {**self.scores, latency_name: self.p50_ms, "size_mb": self.size_mb}


class VariantScorer(Protocol):
    """What a task kind measures on each variant."""

    score_name: str  # the score that fp32_score / served_score report (first of the scores)
    latency_name: str  # the metric name of Candidate.p50_ms

    def score(self, folder: Path, name: str, reference: Any) -> tuple[Candidate, Any]:
        """Score folder/ONNX_FILE against reference (fp32's outputs; None for fp32 itself);
        return the candidate (no gates yet) and its outputs."""
        ...

    def gates(self, candidate: Candidate, fp32: Candidate) -> list[Gate]:
        """The candidate's gates against fp32 (fp32 against itself passes them)."""
        ...


@dataclass(frozen=True)
class Choice:
    """The outcome of the stage: every candidate, the chosen one, its gates and why."""

    fp32: Candidate
    candidates: list[Candidate]
    chosen: Candidate
    gates: list[Gate]
    instruction_set: str
    reason: str


def choose(fp32: Candidate, candidates: list[Candidate], fallback: bool) -> tuple[Candidate, str]:
    """The fastest candidate that passes its gates and beats fp32; else fp32 (if allowed)."""
    passing = [c for c in candidates if c.passed]
    faster = [c for c in passing if c.p50_ms < fp32.p50_ms]
    if faster:
        best = min(faster, key=lambda c: c.p50_ms)
        return best, (
            f"{best.name}: fastest variant passing the gates, batch-1 p50 "
            f"{best.p50_ms:.2f} ms vs fp32 {fp32.p50_ms:.2f} ms"
        )
    if passing:
        why = f"no variant passing the gates beat fp32's batch-1 p50 of {fp32.p50_ms:.2f} ms"
    else:
        why = "every variant failed a gate: " + "; ".join(
            f"{c.name} ({', '.join(g.describe() for g in c.gates if not g.passed)})"
            for c in candidates
        )
    if not fallback:
        failed = next((g for c in candidates for g in c.gates if not g.passed), None)
        if failed is not None:
            raise GateFailed(failed)
        raise GateFailed(evaluate_gate("quantized_faster_than_fp32", 0.0, 1.0, ">="))
    return fp32, f"serving fp32: {why}"


def build_variants(
    config, fp32_dir: Path, out_dir: Path, scorer: VariantScorer, calibration: Callable[[], Any]
) -> Choice:
    """Score fp32, then build and score each variant (fp16 for a GPU target), and choose."""
    gpu = config.serve.device == "cuda"
    isa = "cuda_fp16" if gpu else instruction_set()
    fp32, reference = scorer.score(fp32_dir, "fp32", None)
    candidates = []
    for name in ["fp16"] if gpu else config.quantize.variants:
        variant_dir = out_dir / "variants" / name
        variant_dir.mkdir(parents=True)
        if gpu:
            convert_fp16(fp32_dir / ONNX_FILE, variant_dir / ONNX_FILE)
        else:
            quantize_variant(fp32_dir, variant_dir, name, isa, calibration)
        copy_missing_files(fp32_dir, variant_dir)  # config, tokenizer: a loadable folder
        candidate, _ = scorer.score(variant_dir, name, reference)
        candidates.append(replace(candidate, gates=scorer.gates(candidate, fp32)))
    chosen, reason = choose(fp32, candidates, config.quantize.fallback_to_fp32)
    gates = chosen.gates or scorer.gates(fp32, fp32)
    return Choice(fp32, candidates, chosen, gates, isa, reason)


def served_folder(out_dir: Path, model_file: str, fp32_dir: Path) -> Path:
    """out_dir/served: the chosen ONNX file as SERVED_FILE, with fp32's tokenizer and configs."""
    served_dir = out_dir / "served"
    served_dir.mkdir()
    shutil.copy2(model_file, served_dir / SERVED_FILE)
    copy_missing_files(fp32_dir, served_dir)
    return served_dir


def quantize_stage(
    stage, fp32_ref: ArtifactRef, scorer: VariantScorer, calibration: Callable[[], Any]
) -> tuple[ArtifactRef, Choice]:
    """The whole stage in a StageContext: variants, choice, served folder, everything logged."""
    fp32_dir = stage.fetch(fp32_ref)
    out_dir = stage.stage_dir("quantized")
    if out_dir.exists():
        shutil.rmtree(out_dir)  # a retried stage starts clean
    choice = build_variants(stage.config, fp32_dir, out_dir, scorer, calibration)
    served_dir = served_folder(out_dir, choice.chosen.model_file, fp32_dir)
    log_choice(stage.run, choice, scorer)
    return stage.run.log_folder(served_dir, "quantized"), choice


def log_choice(run: TrackedRun, choice: Choice, scorer: VariantScorer) -> None:
    """Every variant's figures, the gates, tags, and quantized/choice.json."""
    fp32, chosen, latency = choice.fp32, choice.chosen, scorer.latency_name
    metrics = {
        f"quantize/fp32.{name}": value
        for name, value in fp32.figures(latency).items()
        if "agreement" not in name
    }
    metrics["quantize/served.size_ratio"] = chosen.size_mb / fp32.size_mb
    metrics[f"quantize/served.{scorer.score_name}"] = chosen.scores[scorer.score_name]
    for c in choice.candidates:
        metrics |= {f"quantize/{c.name}.{k}": v for k, v in c.figures(latency).items()}
        metrics[f"quantize/{c.name}.passed"] = float(c.passed)
    run.log_metrics(metrics)
    for gate in choice.gates:
        run.log_gate(gate)
    run.set_tags(
        {
            "quantize.instruction_set": choice.instruction_set,
            "quantize.variant": chosen.name,
            "quantize.reason": choice.reason[:5000],
        }
    )

    def entry(c: Candidate) -> dict:
        return {"name": c.name, "model_file": c.model_file, **c.figures(latency)} | {
            "gates": [g.as_dict() for g in c.gates]
        }

    run.log_json(
        {
            "chosen": chosen.name,
            "reason": choice.reason,
            "instruction_set": choice.instruction_set,
            "fp32": entry(fp32) | {"gates": []},
            "candidates": [entry(c) for c in choice.candidates],
        },
        "quantized/choice.json",
    )
