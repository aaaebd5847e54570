"""ONNX for every task kind: optimum's export, onnxruntime sessions, int8 and fp16 variants."""

from __future__ import annotations

import platform
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from optimum.exporters.onnx import main_export
from optimum.onnxruntime import ORTQuantizer
from optimum.onnxruntime.configuration import (
    AutoCalibrationConfig,
    AutoQuantizationConfig,
    QuantizationConfig,
)
from torch.jit import TracerWarning

from tasks.common.console import expected, expected_warning
from tasks.common.errors import PipelineError

ONNX_FILE = "model.onnx"
SERVED_FILE = "model_served.onnx"  # whichever variant ships, under one name
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
TORCH_DTYPE = "`torch_dtype` is deprecated"
# onnxruntime's quantizer on transformer graphs: LayerNorm scales (rank 1) offered for
# per-channel, LayerNorm biases and the pooler's Gemm bias computed rather than stored
QUANTIZER_NOTES = (
    r"^(Axis -?\d+ is out-of-range for weight|Expected bias .* to be an initializer"
    r"|Bias of Gemm node .* is not constant)"
)


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest absolute difference of two arrays (inf when their shapes differ)."""
    if a.shape != b.shape:
        return float("inf")
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0


def max_abs_diff_all(first: list[np.ndarray], second: list[np.ndarray]) -> float:
    """max_abs_diff over pairs of arrays (inf when the lists differ in length)."""
    if len(first) != len(second):
        return float("inf")
    return max((max_abs_diff(a, b) for a, b in zip(first, second, strict=True)), default=0.0)


def providers_for(device: str) -> list[str]:
    """Execution providers to request: CUDA first when asked for (or auto and available)."""
    available = ort.get_available_providers()
    if device == "cuda" or (device == "auto" and CUDA in available):
        return [CUDA, CPU]
    return [CPU]


def require_provider(device: str, providers: list[str], file_name: str) -> None:
    """Asking for cuda and not getting the CUDA provider is an error, never a silent CPU run."""
    if device == "cuda" and providers[0] != CUDA:
        raise PipelineError(
            f"serve.device is cuda but onnxruntime runs {file_name} on {providers}: install "
            f"onnxruntime-gpu with a matching CUDA, or set serve.device to cpu"
        )


def session_options(num_threads: int = 0) -> ort.SessionOptions:
    """Fixed intra-op threads (0: all cores), one inter-op thread, sequential execution."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = num_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return options


def open_session(
    model_file: Path, device: str = "cpu", num_threads: int = 0
) -> ort.InferenceSession:
    """A session on the requested device; asking for cuda and not getting it is an error."""
    session = ort.InferenceSession(
        str(model_file), session_options(num_threads), providers=providers_for(device)
    )
    require_provider(device, session.get_providers(), model_file.name)
    return session


def optimum_export(merged_dir: Path, out_dir: Path, task: str, opset: int | None) -> Path:
    """optimum's ONNX export of a merged model folder into a clean folder.

    Not shown (-v shows them): the TracerWarnings of tracing transformers' models (constants
    and Python control flow in their code), torch.onnx's note on advanced indexing (KV-cache
    decoders; the parity gates check both), and the `torch_dtype` deprecation that optimum's
    own from_pretrained call (torch_dtype=float32) sets off."""
    if out_dir.exists():
        shutil.rmtree(out_dir)  # a retried export starts clean
    with (
        expected_warning(TracerWarning, module=r"(transformers|optimum)\."),
        expected_warning(UserWarning, r"torch\.onnx\.", "Exporting aten::index operator"),
        expected(("transformers.configuration_utils", "transformers.modeling_utils"), TORCH_DTYPE),
    ):
        main_export(
            str(merged_dir),
            out_dir,
            task=task,
            opset=opset,
            do_validation=False,
            local_files_only=True,
        )
    return out_dir


def copy_missing_files(source: Path, target: Path) -> None:
    """Tokenizer, chat template and config files of source that target lacks (weights aside)."""
    for item in source.iterdir():
        if (
            item.is_file()
            and item.suffix not in (".safetensors", ".onnx", ".onnx_data")
            and not (target / item.name).exists()
        ):
            shutil.copy2(item, target / item.name)


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


def quantize_variant(
    fp32_dir: Path, out_dir: Path, variant: str, isa: str, calibration: Callable[[], Any]
) -> Path:
    """Write one int8 variant; static variants are calibrated (min/max) on calibration().
    onnxruntime's notes on the graph (QUANTIZER_NOTES) are not shown (-v shows them)."""
    with expected("", QUANTIZER_NOTES, source="onnxruntime/quantization/"):
        return _quantize_variant(fp32_dir, out_dir, variant, isa, calibration)


def _quantize_variant(
    fp32_dir: Path, out_dir: Path, variant: str, isa: str, calibration: Callable[[], Any]
) -> Path:
    qconfig = quantization_config(variant, isa)
    quantizer = ORTQuantizer.from_pretrained(str(fp32_dir), file_name=ONNX_FILE)
    ranges = None
    if qconfig.is_static:
        rows = calibration()
        ranges = quantizer.fit(
            dataset=rows,
            calibration_config=AutoCalibrationConfig.minmax(rows),
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
    import onnx  # imported here: only a GPU target converts
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(fp32_file)), keep_io_types=True)
    onnx.save(model, str(out_file))
    return out_file
