"""Stage 6: quantize the ONNX model, score and time every variant, ship the fastest that passes.

CPU targets try int8 variants (dynamic or static, per-channel or per-tensor) with the kernels
that fit this CPU; a variant ships only if it passes the agreement and accuracy gates and is
faster than fp32 at batch 1. Otherwise fp32 ships and the reason is recorded. A GPU target
(serve.device cuda) ships fp16 ONNX for the CUDA provider instead.
"""

from __future__ import annotations

import platform
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from datasets import load_from_disk
from optimum.onnxruntime import ORTQuantizer
from optimum.onnxruntime.configuration import (
    AutoCalibrationConfig,
    AutoQuantizationConfig,
    QuantizationConfig,
)

from tasks.config import PipelineConfig
from tasks.errors import GateFailed
from tasks.evaluate import load_test_split
from tasks.export_onnx import ONNX_FILE, OnnxModel
from tasks.gates import Gate, evaluate_gate
from tasks.latency import latency_ms
from tasks.modeling import load_tokenizer
from tasks.onnx_runtime import open_session, session_logits
from tasks.prepare_data import PreparedData
from tasks.stage import stage_task
from tasks.storage import stage_dir
from tasks.tracking import (
    ArtifactRef,
    connect,
    log_folder,
    log_gate,
    log_json,
    log_metrics,
    set_tags,
    stage_timer,
)

SERVED_FILE = "model_served.onnx"  # whichever variant ships, under one name
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass(frozen=True)
class Candidate:
    """One variant's scores: agreement and accuracy vs fp32, batch-1 latency, size, gates."""

    name: str
    model_file: str
    accuracy: float
    top1_agreement: float
    p50_ms: float
    size_mb: float
    gates: list[Gate] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)


@dataclass(frozen=True)
class QuantizedModel:
    """The folder that will be served (SERVED_FILE + tokenizer + config) and why it was chosen.

    score_name is what fp32_score and served_score measure on the test split: accuracy
    (sequence_classification) or perplexity (causal_lm).
    """

    model: ArtifactRef
    variant: str
    instruction_set: str
    score_name: str
    fp32_score: float
    served_score: float
    reason: str
    gates: list[Gate]
    candidates: list[Candidate]


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty where unknown."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def instruction_set(flags: set[str] | None = None, machine: str | None = None) -> str:
    """Which onnxruntime int8 kernel family fits this CPU: arm64, avx512_vnni, avx512 or avx2."""
    machine = (machine or platform.machine()).lower()
    if machine in ("arm64", "aarch64"):
        return "arm64"
    flags = cpu_flags() if flags is None else flags
    if "avx512_vnni" in flags or "avx512vnni" in flags:
        return "avx512_vnni"
    if "avx512f" in flags:
        return "avx512"
    return "avx2"


def quantization_config(variant: str, isa: str) -> QuantizationConfig:
    """optimum's int8 config for a variant name like 'static_per_channel' on an ISA."""
    mode, _, granularity = variant.partition("_per_")
    return getattr(AutoQuantizationConfig, isa)(
        is_static=mode == "static", per_channel=granularity == "channel"
    )


def _calibration_set(data: PreparedData, samples: int):
    train = load_from_disk(str(data.dataset.fetch() / "tokenized"))["train"]
    columns = [c for c in MODEL_INPUTS if c in train.column_names]
    return train.select(range(min(samples, len(train)))).select_columns(columns)


def quantize_variant(
    fp32_dir: Path,
    out_dir: Path,
    variant: str,
    isa: str,
    data: PreparedData,
    config: PipelineConfig,
) -> Path:
    """Write one int8 variant; static variants are calibrated (min/max) on training texts."""
    qconfig = quantization_config(variant, isa)
    quantizer = ORTQuantizer.from_pretrained(str(fp32_dir), file_name=ONNX_FILE)
    ranges = None
    if qconfig.is_static:
        calibration = _calibration_set(data, config.quantize.calibration_samples)
        ranges = quantizer.fit(
            dataset=calibration,
            calibration_config=AutoCalibrationConfig.minmax(calibration),
            onnx_augmented_model_name=str(out_dir / "augmented_model.onnx"),
            operators_to_quantize=qconfig.operators_to_quantize,
        )
        (out_dir / "augmented_model.onnx").unlink(missing_ok=True)
    quantizer.quantize(
        quantization_config=qconfig,
        save_dir=out_dir,
        file_suffix=None,
        calibration_tensors_range=ranges,
    )
    return out_dir / ONNX_FILE


def convert_fp16(fp32_file: Path, out_file: Path) -> Path:
    """fp16 weights and activations, fp32 inputs/outputs (for the CUDA provider)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(fp32_file)), keep_io_types=True)
    onnx.save(model, str(out_file))
    return out_file


def _score(
    model_file: Path,
    name: str,
    tokenizer,
    test,
    config: PipelineConfig,
    device: str,
    fp32_pred: np.ndarray | None,
) -> tuple[Candidate, np.ndarray]:
    session = open_session(model_file, device=device, num_threads=config.serve.num_threads)
    predictions = np.argmax(
        session_logits(
            session, tokenizer, test["text"], config.data.max_length, config.eval.batch_size
        ),
        axis=-1,
    )
    singles = [
        tokenizer([t], truncation=True, max_length=config.data.max_length, return_tensors="np")
        for t in test["text"][:32]
    ]
    wanted = {i.name for i in session.get_inputs()}
    timing = latency_ms(
        lambda b: session.run(
            ["logits"], {k: v.astype(np.int64) for k, v in b.items() if k in wanted}
        ),
        singles,
        config.serve.warmup_runs,
        max(20, config.serve.latency_runs // 2),
    )
    accuracy = float(np.mean(predictions == np.asarray(test["labels"])))
    agreement = 1.0 if fp32_pred is None else float(np.mean(predictions == fp32_pred))
    candidate = Candidate(
        name=name,
        model_file=str(model_file),
        accuracy=accuracy,
        top1_agreement=agreement,
        p50_ms=timing["p50_ms"],
        size_mb=model_file.stat().st_size / 2**20,
    )
    return candidate, predictions


def _with_gates(candidate: Candidate, fp32: Candidate, config: PipelineConfig) -> Candidate:
    gates = [
        evaluate_gate(
            "quantized_top1_agreement",
            candidate.top1_agreement,
            config.quantize.min_top1_agreement,
            ">=",
        ),
        evaluate_gate(
            "quantized_accuracy_drop",
            fp32.accuracy - candidate.accuracy,
            config.quantize.max_accuracy_drop,
            "<=",
        ),
    ]
    return Candidate(**{**candidate.__dict__, "gates": gates})


def served_folder(out_dir: Path, model_file: str, fp32_dir: Path) -> Path:
    """out_dir/served: the chosen ONNX file as SERVED_FILE, with fp32's tokenizer and configs."""
    served_dir = out_dir / "served"
    served_dir.mkdir()
    shutil.copy2(model_file, served_dir / SERVED_FILE)
    for item in fp32_dir.iterdir():  # tokenizer and config travel with the model
        if item.is_file() and item.suffix != ".onnx":
            shutil.copy2(item, served_dir / item.name)
    return served_dir


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


def quantize(
    config: PipelineConfig, data: PreparedData, onnx: OnnxModel, run_id: str
) -> QuantizedModel:
    """Build the variants, score and time each against fp32, pick one, log everything."""
    if config.task == "causal_lm":
        from tasks.causal.quantize import quantize_causal  # imported here: it imports this module

        return quantize_causal(config, data, onnx, run_id)
    connect(config.tracking)
    with stage_timer(run_id, "quantize"):
        fp32_dir = onnx.model.fetch()
        out_dir = stage_dir(config, run_id, "quantized")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        test = load_test_split(data)
        tokenizer = load_tokenizer(config.model)
        gpu = config.serve.device == "cuda"
        device = "cuda" if gpu else "cpu"
        isa = "cuda_fp16" if gpu else instruction_set()

        fp32, fp32_pred = _score(
            fp32_dir / ONNX_FILE, "fp32", tokenizer, test, config, device, None
        )
        candidates = []
        names = ["fp16"] if gpu else config.quantize.variants
        for name in names:
            variant_dir = out_dir / "variants" / name
            variant_dir.mkdir(parents=True)
            if gpu:
                model_file = convert_fp16(fp32_dir / ONNX_FILE, variant_dir / ONNX_FILE)
            else:
                model_file = quantize_variant(fp32_dir, variant_dir, name, isa, data, config)
            candidate, _ = _score(model_file, name, tokenizer, test, config, device, fp32_pred)
            candidates.append(_with_gates(candidate, fp32, config))
        chosen, reason = choose(fp32, candidates, config.quantize.fallback_to_fp32)

        served_dir = served_folder(out_dir, chosen.model_file, fp32_dir)
        gates = chosen.gates or _with_gates(fp32, fp32, config).gates
        log_choice(run_id, fp32, candidates, chosen, gates, isa, reason, CLASSIFIER_FIELDS)
        ref = log_folder(run_id, served_dir, "quantized")
    return QuantizedModel(
        model=ref,
        variant=chosen.name,
        instruction_set=isa,
        score_name="accuracy",
        fp32_score=fp32.accuracy,
        served_score=chosen.accuracy,
        reason=reason,
        gates=gates,
        candidates=candidates,
    )


# metric name -> Candidate attribute; the first is the score ("quantize.served.<it>")
CLASSIFIER_FIELDS = {
    "accuracy": "accuracy",
    "top1_agreement": "top1_agreement",
    "p50_ms": "p50_ms",
    "size_mb": "size_mb",
}


def log_choice(run_id, fp32, candidates, chosen, gates, isa, reason, fields: dict[str, str]):
    """Every variant's figures, the gates, tags, and quantized/choice.json."""
    score = next(iter(fields))
    metrics = {
        f"quantize.fp32.{name}": getattr(fp32, attr)
        for name, attr in fields.items()
        if "agreement" not in name
    }
    metrics["quantize.served.size_ratio"] = chosen.size_mb / fp32.size_mb
    metrics[f"quantize.served.{score}"] = getattr(chosen, fields[score])
    for c in candidates:
        metrics |= {f"quantize.{c.name}.{name}": getattr(c, attr) for name, attr in fields.items()}
        metrics[f"quantize.{c.name}.passed"] = float(c.passed)
    log_metrics(run_id, metrics)
    for gate in gates:
        log_gate(run_id, gate)
    set_tags(
        run_id,
        {
            "quantize.instruction_set": isa,
            "quantize.variant": chosen.name,
            "quantize.reason": reason[:5000],
        },
    )
    log_json(
        run_id,
        {
            "chosen": chosen.name,
            "reason": reason,
            "instruction_set": isa,
            "fp32": fp32.__dict__ | {"gates": []},
            "candidates": [
                c.__dict__ | {"gates": [g.as_dict() for g in c.gates]} for c in candidates
            ],
        },
        "quantized/choice.json",
    )


quantize_task = stage_task(quantize, name="quantize", retries=1)
