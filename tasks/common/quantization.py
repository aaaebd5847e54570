"""The quantize stage for every task kind: build variants, score each against fp32, pick one.

CPU targets try the configured int8 variants (dynamic or static, per-channel or per-tensor)
with the kernels that fit this CPU, the task's head nodes kept in fp32; static variants are
calibrated once on training rows (quantize.calibration_method). When
quantize.mixed_precision_base fails its gates, the sensitivity search (mixed_precision.py)
adds mixes of it with its most sensitive nodes in fp32, or smoothed (SmoothQuant) where that
measurably helps. A GPU target (serve.device cuda)
tries fp16. A variant ships only when it passes its gates and answers faster than fp32 at
batch 1 (fp32 and the passing variants are timed again side by side for that comparison);
otherwise fp32 ships and the reason is recorded. What "score", "probe" and "gates"
mean is the task kind's: it hands in a VariantScorer.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from tasks.common.errors import GateFailed
from tasks.common.gates import Gate, evaluate_gate
from tasks.common.latency import interleaved
from tasks.common.mixed_precision import (
    Sensitivity,
    VariantBuilder,
    by_effect,
    kept_for_sensitivity,
    measure_sensitivity,
    measure_smoothing,
    mix_sizes,
    smoothed_for_sensitivity,
)
from tasks.common.onnx import (
    ONNX_FILE,
    SERVED_FILE,
    convert_fp16,
    copy_missing_files,
    instruction_set,
    weighted_nodes,
)
from tasks.common.tracking import ArtifactRef, TrackedRun

# Timed requests per engine when fp32 and the passing candidates are timed side by side for
# the choice (at least; serve.latency_runs when larger). On the AVX2-only CPU of 2026-12-07,
# where int8 is only 1.2-1.3x fp32, 25 requests per engine put a mixed int8 graph at 0.73 to
# 0.88 of fp32 in five repeats (and once at 1.07 in the stage, which then served fp32); 100
# put it at 0.76 to 0.81. It costs about a second on the demo.
RETIME_CALLS = 100


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
    kept_fp32: dict[str, str] = field(default_factory=dict)  # node -> why it is not int8
    smoothed: dict[str, str] = field(default_factory=dict)  # node -> why SmoothQuant rewrote it

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
    head_pattern: str  # regex on node names: the nodes that always stay fp32 ("" for none)

    def score(self, folder: Path, name: str, reference: Any) -> tuple[Candidate, Any]:
        """Score folder/ONNX_FILE against reference (fp32's outputs; None for fp32 itself);
        return the candidate (no gates yet) and its outputs."""
        ...

    def gates(self, candidate: Candidate, fp32: Candidate) -> list[Gate]:
        """The candidate's gates against fp32 (fp32 against itself passes them)."""
        ...

    def requests(self, folder: Path) -> tuple[Callable[[Any], Any], Sequence[Any], float]:
        """A batch-1 request on folder's graph, the inputs to send, and the divisor that turns
        one request's milliseconds into the latency figure (Candidate.p50_ms)."""
        ...

    def probe(self, folder: Path) -> np.ndarray:
        """folder/ONNX_FILE's logits on the probe rows (not the test split): what the
        sensitivity search compares with fp32's, rows by classes (or vocabulary)."""
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
    sensitivity: list[Sensitivity] = field(default_factory=list)  # most sensitive first
    sensitivity_base: str | None = None  # the variant the search measured


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


def head_nodes(model_file: Path, pattern: str) -> dict[str, str]:
    """The quantizable nodes whose names match the task's head pattern: kept fp32 always.

    onnxruntime's dynamic quantizer first rewrites each Gemm as a MatMul named `<Gemm>_MatMul`
    (plus an Add) and then looks the exclusions up by the new name: both names are listed, or
    a Gemm head (BERT's pooler and classifier) would be quantized after all."""
    if not pattern:
        return {}
    operators = ("MatMul", "Gemm", "Attention", "Gather", "EmbedLayerNormalization")
    head = {}
    for name, op_type in weighted_nodes(model_file, operators):
        if re.search(pattern, name):
            head[name] = "task head: always kept in fp32"
            if op_type == "Gemm":
                head[f"{name}_MatMul"] = "task head: always kept in fp32 (the quantizer's MatMul)"
    return head


def scored(
    scorer: VariantScorer, folder: Path, name: str, reference: Any, fp32: Candidate, kept: dict
) -> Candidate:
    """folder scored against fp32, with its gates and the nodes it keeps in fp32."""
    candidate, _ = scorer.score(folder, name, reference)
    return replace(candidate, gates=scorer.gates(candidate, fp32), kept_fp32=dict(kept))


def build_fp16(
    config, fp32_dir: Path, out_dir: Path, scorer: VariantScorer, fp32: Candidate, reference: Any
) -> Choice:
    """A GPU target's one candidate: fp16 ONNX for the CUDA provider."""
    folder = out_dir / "variants" / "fp16"
    folder.mkdir(parents=True)
    convert_fp16(fp32_dir / ONNX_FILE, folder / ONNX_FILE)
    copy_missing_files(fp32_dir, folder)
    candidates = [scored(scorer, folder, "fp16", reference, fp32, {})]
    chosen, reason = choose(fp32, candidates, config.quantize.fallback_to_fp32)
    gates = chosen.gates or scorer.gates(fp32, fp32)
    return Choice(fp32, candidates, chosen, gates, "cuda_fp16", reason)


def build_variants(
    config, fp32_dir: Path, out_dir: Path, scorer: VariantScorer, calibration: Callable[[], Any]
) -> Choice:
    """Score fp32, then build and score each variant (fp16 for a GPU target), search mixes
    when the mixed-precision base fails, and choose."""
    fp32, reference = scorer.score(fp32_dir, "fp32", None)
    if config.serve.device == "cuda":
        return build_fp16(config, fp32_dir, out_dir, scorer, fp32, reference)
    isa = instruction_set()
    head = head_nodes(fp32_dir / ONNX_FILE, scorer.head_pattern)
    builder = VariantBuilder(fp32_dir, out_dir, isa, head, calibration, config.quantize)
    candidates = [
        scored(scorer, builder.build(name, name), name, reference, fp32, head)
        for name in config.quantize.variants
    ]
    mixes, ranked = search_mixes(builder, scorer, candidates, fp32, reference)
    fp32, candidates = retimed(scorer, fp32_dir, fp32, candidates + mixes, config.serve)
    chosen, reason = choose(fp32, candidates, config.quantize.fallback_to_fp32)
    gates = chosen.gates or scorer.gates(fp32, fp32)
    base = config.quantize.mixed_precision_base if ranked else None
    return Choice(fp32, candidates, chosen, gates, isa, reason, ranked, base)


def retimed(
    scorer: VariantScorer, fp32_dir: Path, fp32: Candidate, candidates: list[Candidate], serve
) -> tuple[Candidate, list[Candidate]]:
    """fp32 and the candidates passing their gates timed again side by side, in turns of a
    few requests (tasks/common/latency.interleaved), so that the choice compares figures
    measured under the same machine load (each candidate was first timed alone, minutes
    apart). Failing candidates keep their figures."""
    passing = [c for c in candidates if c.passed]
    if not passing:
        return fp32, candidates
    folders = [fp32_dir, *(Path(c.model_file).parent for c in passing)]
    engines = [scorer.requests(folder) for folder in folders]
    divisor = engines[0][2]
    runs = {
        str(i): partial(lambda run, inputs, k: run(inputs[k % len(inputs)]), run, inputs)
        for i, (run, inputs, _) in enumerate(engines)
    }
    samples = interleaved(runs, max(RETIME_CALLS, serve.latency_runs), warmup=serve.warmup_runs)
    p50 = {
        id(c): float(np.median(samples[str(i)])) / divisor for i, c in enumerate([fp32, *passing])
    }
    return replace(fp32, p50_ms=p50[id(fp32)]), [
        replace(c, p50_ms=p50[id(c)]) if id(c) in p50 else c for c in candidates
    ]


def search_mixes(
    builder: VariantBuilder,
    scorer: VariantScorer,
    candidates: list[Candidate],
    fp32: Candidate,
    reference: Any,
) -> tuple[list[Candidate], list[Sensitivity]]:
    """When quantize.mixed_precision_base failed its gates: rank its nodes by sensitivity on
    the probe rows (and, where SmoothQuant can rewrite them, smoothed), then score mixes until
    one passes (tasks/common/mixed_precision.py): smooth0_<base> (every node smoothing helps
    smoothed, none in fp32) and, for k = 1, 2, 4, ..., smoothK_<base> (the k units whose best
    int8 form diverges most in fp32, the rest that smoothing helps smoothed) then mixedK_<base>
    (the k most sensitive in fp32, none smoothed). Returns the mixes scored and the ranking
    (both empty: no search)."""
    q = builder.quantize
    base = next((c for c in candidates if c.name == q.mixed_precision_base), None)
    if base is None or base.passed:
        return [], []
    probe_reference = scorer.probe(builder.fp32_dir)
    ranked = measure_sensitivity(
        builder, base.name, scorer.probe, probe_reference, q.sensitivity_max_units
    )
    ranked = measure_smoothing(builder, base.name, ranked, scorer.probe, probe_reference)
    rows, effect = len(probe_reference), by_effect(ranked)
    plan = [("smooth", 0)]
    for k in mix_sizes(len(ranked), q.mixed_max_mixes):
        plan += [("smooth", k), ("mixed", k)]
    mixes: list[Candidate] = []
    for kind, k in plan:
        if kind == "smooth":
            in_fp32 = kept_for_sensitivity(effect, k, rows, smoothed=True)
            smooth = smoothed_for_sensitivity(effect[k:], rows, q.smooth_alpha)
            if not smooth:
                continue  # nothing to smooth: the mixed mix of this size follows
        else:
            in_fp32, smooth = kept_for_sensitivity(ranked, k, rows), {}
        name = f"{kind}{k}_{base.name}"
        folder = builder.build(name, base.name, exclude=list(in_fp32), smooth=list(smooth))
        mix = scored(scorer, folder, name, reference, fp32, builder.head | in_fp32)
        mixes.append(replace(mix, smoothed=smooth))
        if mix.passed:
            break
    return mixes, ranked


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
            "quantize.fp32_nodes": fp32_nodes_tag(chosen)[:5000],
            "quantize.smoothed_nodes": smoothed_nodes_tag(chosen)[:5000],
        }
    )
    run.log_json(choice_json(choice, latency), "quantized/choice.json")


def fp32_nodes_tag(chosen: Candidate) -> str:
    """The served graph's nodes left in fp32 and why, one `node: why` per line."""
    if chosen.name == "fp32":
        return "every node (fp32 served)"
    return why_lines(chosen.kept_fp32)


def smoothed_nodes_tag(chosen: Candidate) -> str:
    """The served graph's nodes that SmoothQuant rewrote and why, one `node: why` per line."""
    return why_lines(chosen.smoothed)


def why_lines(nodes: dict[str, str]) -> str:
    """One `node: why` line per node, or 'none'."""
    return "\n".join(f"{node}: {why}" for node, why in nodes.items()) or "none"


def choice_json(choice: Choice, latency: str) -> dict:
    """quantized/choice.json: every candidate's figures, gates and fp32 nodes, and the search."""

    def entry(c: Candidate) -> dict:
        return {"name": c.name, "model_file": c.model_file, **c.figures(latency)} | {
            "gates": [g.as_dict() for g in c.gates],
            "kept_fp32": c.kept_fp32,
            "smoothed": c.smoothed,
        }

    return {
        "chosen": choice.chosen.name,
        "reason": choice.reason,
        "instruction_set": choice.instruction_set,
        "fp32_nodes": choice.chosen.kept_fp32,
        "smoothed_nodes": choice.chosen.smoothed,
        "fp32": entry(choice.fp32) | {"gates": []},
        "candidates": [entry(c) for c in choice.candidates],
        "sensitivity": {
            "base": choice.sensitivity_base,
            "units": [s.as_dict() for s in choice.sensitivity],
        },
    }
