"""ONNX for every task kind: optimum's export, onnxruntime sessions, int8 and fp16 variants."""

from __future__ import annotations

import io
import json
import platform
import shutil
import sys
from collections.abc import Sequence
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization.calibrate import (
    CalibrationDataReader,
    CalibrationMethod,
    TensorsData,
    create_calibrator,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from onnxruntime.transformers.float16 import convert_float_to_float16
from onnxruntime.transformers.fusion_options import FusionOptions
from onnxruntime.transformers.optimizer import optimize_model
from optimum.exporters.onnx import main_export
from optimum.onnxruntime import ORTQuantizer
from optimum.onnxruntime.configuration import (
    AutoQuantizationConfig,
    QuantizationConfig,
)
from optimum.onnxruntime.utils import ORTConfigManager
from torch.jit import TracerWarning

from tasks.common.console import expected, expected_warning, verbose
from tasks.common.errors import PipelineError
from tasks.common.hardware import cpu_flags

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
# onnxruntime's transformer optimizer on graphs it only partly fuses (decoders with a KV cache,
# heads it detects from the graph): notes on patterns it looked for and did not find
OPTIMIZER_NOTES = r"^(Failed to|Skip|skip|Fused|Removed|fused|--|.*not (found|fused|supported))"
Ranges = TensorsData  # onnxruntime's calibrated activation ranges, by tensor name


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


# onnxruntime's CPU kernel for SkipLayerNormalization (1.32) is 4-8x slower than its
# LayerNormalization plus an Add once a batch holds 32 tokens or more (benchmarks/serving.py
# times both): on CPU the residual Add and the norm stay two nodes, in our fusion pass
# (fuse_graph) and in the session's own graph optimizations.
CPU_SESSION_CONFIG = {"optimization.disable_specified_optimizers": "SkipLayerNormFusion"}


def fuses_skip_layer_norm(device: str) -> bool:
    """Whether a model served on `device` (cpu, cuda, auto) gets SkipLayerNormalization."""
    return providers_for(device)[0] == CUDA


def session_config(device: str) -> dict[str, str]:
    """onnxruntime session config entries for a model served on `device` (cpu, cuda, auto)."""
    return {} if fuses_skip_layer_norm(device) else dict(CPU_SESSION_CONFIG)


def session_options(num_threads: int = 0, device: str = "cpu") -> ort.SessionOptions:
    """Fixed intra-op threads (0: all cores), one inter-op thread, sequential execution, and
    the device's session_config."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = num_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    for key, value in session_config(device).items():
        options.add_session_config_entry(key, value)
    return options


def open_session(
    model_file: Path, device: str = "cpu", num_threads: int = 0
) -> ort.InferenceSession:
    """A session on the requested device; asking for cuda and not getting it is an error."""
    session = ort.InferenceSession(
        str(model_file), session_options(num_threads, device), providers=providers_for(device)
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


def ort_model_type(onnx_dir: Path, default: str) -> str:
    """onnxruntime's optimizer family for the model (optimum's table of config model_types),
    else default: 'bert' for encoders, 'gpt2' (norm and Gelu fusions) for decoders."""
    config = onnx_dir / "config.json"
    model_type = json.loads(config.read_text()).get("model_type", "") if config.is_file() else ""
    try:
        return ORTConfigManager.get_model_ort_type(model_type)
    except (KeyError, NotImplementedError):
        return default


def fuse_graph(onnx_dir: Path, model_type: str, device: str = "cpu") -> dict[str, int]:
    """onnxruntime's transformer optimizer on onnx_dir/model.onnx, in place: ORT's basic graph
    optimizations (portable, opt_level 1) then its fusions (Attention, BiasGelu/FastGelu,
    EmbedLayerNormalization where the graph has the patterns; SkipLayerNormalization only for
    a model served on CUDA, see CPU_SESSION_CONFIG), then ORT's quantization pre-processing
    (symbolic shape inference: the quantizer needs the types of tensors that fused contrib ops
    produce). Returns the fused operators made, by type."""
    model_file = onnx_dir / ONNX_FILE
    external = (onnx_dir / f"{ONNX_FILE}_data").exists()
    options = FusionOptions(model_type)
    options.enable_skip_layer_norm = fuses_skip_layer_norm(device)
    with expected("", OPTIMIZER_NOTES, source="onnxruntime/transformers/"):
        optimized = optimize_model(
            str(model_file), model_type=model_type, opt_level=1, optimization_options=options
        )
    optimized.topological_sort()
    fused_file = onnx_dir / "model_fused.onnx"
    quant_pre_process(
        optimized.model,
        str(fused_file),
        skip_optimization=True,
        auto_merge=True,
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        external_data_location=f"{ONNX_FILE}_data",
    )
    fused_file.replace(model_file)
    stats = optimized.get_fused_operator_statistics()
    return {op: count for op, count in sorted(stats.items()) if count}


def graph_op_types(model_file: Path) -> dict[str, int]:
    """How many nodes of each op type a graph has (weights not loaded)."""
    counts: dict[str, int] = {}
    for node in onnx.load(str(model_file), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def weighted_nodes(model_file: Path, op_types: Sequence[str]) -> list[tuple[str, str]]:
    """(name, op type) of the nodes of these types that read a weight (an initializer), in graph
    order: what int8 quantization turns into integer kernels."""
    graph = onnx.load(str(model_file), load_external_data=False).graph
    weights = {i.name for i in graph.initializer}
    return [
        (node.name, node.op_type)
        for node in graph.node
        if node.op_type in op_types and any(i in weights for i in node.input)
    ]


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


def quantization_config(
    variant: str,
    isa: str,
    nodes_to_exclude: Sequence[str] = (),
    nodes_to_quantize: Sequence[str] = (),
) -> QuantizationConfig:
    """optimum's int8 config for a variant name like 'static_per_channel' on an ISA; nodes in
    nodes_to_exclude stay fp32, and a non-empty nodes_to_quantize quantizes only those."""
    mode, _, granularity = variant.partition("_per_")
    return getattr(AutoQuantizationConfig, isa)(
        is_static=mode == "static",
        per_channel=granularity == "channel",
        nodes_to_exclude=list(nodes_to_exclude),
        nodes_to_quantize=list(nodes_to_quantize),
    )


CALIBRATION_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "percentile": CalibrationMethod.Percentile,
    "entropy": CalibrationMethod.Entropy,
}


class RowsReader(CalibrationDataReader):
    """onnxruntime's calibration reader over rows of equal length, one row per run."""

    def __init__(self, rows: Sequence[dict[str, np.ndarray]]) -> None:
        self._rows = iter(rows)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._rows, None)


def rows_by_length(rows) -> list[list[dict[str, np.ndarray]]]:
    """Calibration rows (dicts of token-id lists) as batch-1 int64 arrays, grouped by length:
    the histogram calibrators stack each tensor over the rows of one collect_data call."""
    groups: dict[int, list[dict[str, np.ndarray]]] = {}
    for row in rows:
        arrays = {k: np.asarray([v], dtype=np.int64) for k, v in row.items()}
        groups.setdefault(arrays["input_ids"].shape[1], []).append(arrays)
    return [groups[length] for length in sorted(groups)]


def calibrate(
    fp32_dir: Path,
    work_dir: Path,
    variant: str,
    isa: str,
    rows,
    method: str = "percentile",
    percentile: float = 99.99,
) -> Ranges:
    """Activation ranges of a static variant, from onnxruntime's calibrator (min/max, a
    histogram percentile, or entropy) run on fp32 over the calibration rows; the histograms
    accumulate over groups of equal-length rows, so texts are never padded."""
    operators = quantization_config(variant, isa).operators_to_quantize
    calibrator = create_calibrator(
        str(fp32_dir / ONNX_FILE),
        op_types_to_calibrate=operators,
        augmented_model_path=str(work_dir / "augmented_model.onnx"),
        calibrate_method=CALIBRATION_METHODS[method],
        extra_options={"percentile": percentile, "symmetric": False},
    )
    # the calibrators print their progress: never onto stdout (the CLI's JSON result)
    progress = sys.stderr if verbose() else io.StringIO()
    with (
        expected("", QUANTIZER_NOTES, source="onnxruntime/quantization/"),
        redirect_stdout(progress),
    ):
        for group in rows_by_length(rows):
            calibrator.collect_data(RowsReader(group))
        ranges = calibrator.compute_data()
    (work_dir / "augmented_model.onnx").unlink(missing_ok=True)
    return ranges


def quantize_variant(
    fp32_dir: Path,
    out_dir: Path,
    qconfig: QuantizationConfig,
    ranges: Ranges | None = None,
) -> Path:
    """Write one int8 graph of fp32_dir/model.onnx into out_dir (static configs need the ranges
    of calibrate()). onnxruntime's notes on the graph (QUANTIZER_NOTES) are not shown."""
    quantizer = ORTQuantizer.from_pretrained(str(fp32_dir), file_name=ONNX_FILE)
    with expected("", QUANTIZER_NOTES, source="onnxruntime/quantization/"):
        quantizer.quantize(
            quantization_config=qconfig,
            save_dir=out_dir,
            file_suffix=None,
            calibration_tensors_range=ranges if qconfig.is_static else None,
        )
    return out_dir / ONNX_FILE


def convert_fp16(fp32_file: Path, out_file: Path) -> Path:
    """fp16 weights and activations, fp32 inputs/outputs (for the CUDA provider)."""
    model = convert_float_to_float16(onnx.load(str(fp32_file)), keep_io_types=True)
    onnx.save(model, str(out_file))
    return out_file
