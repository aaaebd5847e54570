"""Stage 6: dynamic int8 quantization with onnxruntime (through optimum), gated on agreement."""

from __future__ import annotations

import platform
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from optimum.onnxruntime import ORTQuantizer
from optimum.onnxruntime.configuration import AutoQuantizationConfig, QuantizationConfig
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.config import PipelineConfig, QuantizeConfig
from tasks.errors import retry_unless_user_error
from tasks.evaluate import load_test_split
from tasks.export_onnx import ONNX_FILE, OnnxModel
from tasks.gates import Gate, evaluate_gate, require
from tasks.modeling import load_tokenizer
from tasks.onnx_runtime import open_session, session_logits
from tasks.prepare_data import PreparedData
from tasks.tracking import (
    ArtifactRef,
    connect,
    log_folder,
    log_gate,
    log_metrics,
    set_tags,
    stage_timer,
)

QUANTIZED_FILE = "model_quantized.onnx"


@dataclass(frozen=True)
class QuantizedModel:
    """The int8 ONNX model folder (model_quantized.onnx + tokenizer + config) and its gates."""

    model: ArtifactRef
    instruction_set: str
    fp32_accuracy: float
    int8_accuracy: float
    gates: list[Gate]


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


def quantization_config(settings: QuantizeConfig, isa: str) -> QuantizationConfig:
    """optimum's dynamic int8 config for the instruction set."""
    factory = getattr(AutoQuantizationConfig, isa)
    return factory(is_static=False, per_channel=settings.per_channel)


def quantize(
    config: PipelineConfig, data: PreparedData, onnx: OnnxModel, run_id: str
) -> QuantizedModel:
    """Quantize, then gate on top-1 agreement with fp32 and on the accuracy drop."""
    connect(config.tracking)
    with stage_timer(run_id, "quantize"):
        fp32_dir = onnx.model.fetch()
        out_dir = Path(config.output_dir) / run_id / "onnx_int8"
        if out_dir.exists():
            shutil.rmtree(out_dir)
        isa = instruction_set()
        quantizer = ORTQuantizer.from_pretrained(str(fp32_dir), file_name=ONNX_FILE)
        quantizer.quantize(
            quantization_config=quantization_config(config.quantize, isa), save_dir=out_dir
        )
        for item in fp32_dir.iterdir():  # tokenizer and config travel with the model
            if item.is_file() and item.suffix != ".onnx" and not (out_dir / item.name).exists():
                shutil.copy2(item, out_dir / item.name)

        test = load_test_split(data)
        tokenizer = load_tokenizer(config.model)
        y_true = np.asarray(test["labels"])
        fp32_pred = _predict(fp32_dir / ONNX_FILE, tokenizer, test["text"], config)
        int8_pred = _predict(out_dir / QUANTIZED_FILE, tokenizer, test["text"], config)
        agreement = float(np.mean(fp32_pred == int8_pred))
        fp32_acc, int8_acc = (
            float(np.mean(fp32_pred == y_true)),
            float(np.mean(int8_pred == y_true)),
        )
        fp32_mb = (fp32_dir / ONNX_FILE).stat().st_size / 2**20
        int8_mb = (out_dir / QUANTIZED_FILE).stat().st_size / 2**20
        log_metrics(
            run_id,
            {
                "quantize.fp32_accuracy": fp32_acc,
                "quantize.int8_accuracy": int8_acc,
                "quantize.int8_size_mb": int8_mb,
                "quantize.size_ratio": int8_mb / fp32_mb,
            },
        )
        set_tags(
            run_id,
            {
                "quantize.instruction_set": isa,
                "quantize.per_channel": str(config.quantize.per_channel),
            },
        )
        gates = [
            log_gate(
                run_id,
                evaluate_gate(
                    "quantized_top1_agreement", agreement, config.quantize.min_top1_agreement, ">="
                ),
            ),
            log_gate(
                run_id,
                evaluate_gate(
                    "quantized_accuracy_drop",
                    fp32_acc - int8_acc,
                    config.quantize.max_accuracy_drop,
                    "<=",
                ),
            ),
        ]
        for gate in gates:
            require(gate)
        ref = log_folder(run_id, out_dir, "onnx_int8")
    return QuantizedModel(
        model=ref, instruction_set=isa, fp32_accuracy=fp32_acc, int8_accuracy=int8_acc, gates=gates
    )


def _predict(model_file: Path, tokenizer, texts, config: PipelineConfig) -> np.ndarray:
    session = open_session(model_file, device="cpu", num_threads=config.serve.num_threads)
    logits = session_logits(
        session, tokenizer, texts, config.data.max_length, config.eval.batch_size
    )
    return np.argmax(logits, axis=-1)


@task(
    name="quantize",
    retries=1,
    retry_delay_seconds=5,
    cache_policy=NO_CACHE,
    retry_condition_fn=retry_unless_user_error,
)
def quantize_task(
    config: PipelineConfig, data: PreparedData, onnx: OnnxModel, run_id: str
) -> QuantizedModel:
    """Prefect wrapper around quantize."""
    return quantize(config, data, onnx, run_id)
