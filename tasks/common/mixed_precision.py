"""Sensitivity-guided mixed precision: which int8 nodes to keep in fp32 so the gates pass.

int8 breaks a transformer at a few places (an activation with outlier channels, a layer whose
errors the next ones amplify), not everywhere. So each quantizable node is quantized alone,
everything else fp32, and its effect on the outputs measured on a small probe set (mean KL
divergence of the output distributions from fp32's). The most sensitive nodes are then kept in
fp32, 1, 2, 4, ... at a time, and each such mix is scored with the full gates until one passes.
Bounded: at most quantize.sensitivity_max_units quantize-and-probe runs (more nodes than that
are measured in runs of consecutive nodes) and quantize.mixed_max_mixes fully scored mixes.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tasks.common.onnx import (
    ONNX_FILE,
    Ranges,
    calibrate,
    copy_missing_files,
    quantization_config,
    quantize_variant,
    weighted_nodes,
)


@dataclass(frozen=True)
class Sensitivity:
    """How far quantizing one unit alone (a node, or a run of consecutive nodes) moves the
    outputs: mean KL(fp32 || unit in int8) over the probe rows."""

    nodes: tuple[str, ...]
    divergence: float

    def as_dict(self) -> dict:
        return {"nodes": list(self.nodes), "kl_divergence": self.divergence}


@dataclass
class VariantBuilder:
    """Writes int8 graphs of one fp32 folder: the head nodes always stay fp32, and each static
    variant is calibrated once (its activation ranges serve every mix built from it)."""

    fp32_dir: Path
    out_dir: Path
    isa: str
    head: dict[str, str]  # node -> why it stays fp32
    calibration: Callable[[], Any]
    quantize: Any  # QuantizeConfig
    _ranges: dict[str, Ranges] = field(default_factory=dict)

    def build(
        self, name: str, variant: str, exclude: Sequence[str] = (), only: Sequence[str] = ()
    ) -> Path:
        """out_dir/variants/name: variant with the head and `exclude` in fp32 (and, when `only`
        is given, every node but those), plus fp32's config and tokenizer files."""
        folder = self.out_dir / "variants" / name
        folder.mkdir(parents=True)
        qconfig = quantization_config(variant, self.isa, [*self.head, *exclude], only)
        ranges = self.ranges(variant) if qconfig.is_static else None
        quantize_variant(self.fp32_dir, folder, qconfig, ranges)
        copy_missing_files(self.fp32_dir, folder)  # config, tokenizer: a loadable folder
        return folder

    def ranges(self, variant: str) -> Ranges:
        """The static variant's activation ranges, calibrated on first use."""
        if variant not in self._ranges:
            q, work = self.quantize, self.out_dir / "calibration"
            work.mkdir(parents=True, exist_ok=True)
            self._ranges[variant] = calibrate(
                self.fp32_dir,
                work,
                variant,
                self.isa,
                self.calibration(),
                q.calibration_method,
                q.calibration_percentile,
            )
        return self._ranges[variant]

    def quantizable(self, variant: str) -> list[str]:
        """The nodes the variant turns into int8 kernels, head excluded, in graph order."""
        operators = quantization_config(variant, self.isa).operators_to_quantize
        nodes = weighted_nodes(self.fp32_dir / ONNX_FILE, operators)
        return [name for name, _ in nodes if name not in self.head]


def kl_divergence(reference: np.ndarray, other: np.ndarray) -> float:
    """Mean over rows of KL(softmax(reference) || softmax(other)), classes on the last axis."""
    ref = reference.reshape(-1, reference.shape[-1]).astype(np.float64)
    got = other.reshape(-1, other.shape[-1]).astype(np.float64)
    log_p = ref - np.logaddexp.reduce(ref, axis=-1, keepdims=True)
    log_q = got - np.logaddexp.reduce(got, axis=-1, keepdims=True)
    return float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)))


def units(nodes: Sequence[str], max_units: int) -> list[tuple[str, ...]]:
    """The nodes in at most max_units runs of consecutive nodes (one node each when they fit)."""
    size = max(1, math.ceil(len(nodes) / max_units))
    return [tuple(nodes[i : i + size]) for i in range(0, len(nodes), size)]


def mix_sizes(unit_count: int, max_mixes: int) -> list[int]:
    """How many of the most sensitive units each mix keeps in fp32: 1, 2, 4, ... (at most
    max_mixes sizes, the last one possibly every unit)."""
    sizes, k = [], 1
    while len(sizes) < max_mixes and (not sizes or sizes[-1] < unit_count):
        sizes.append(min(k, unit_count))
        k *= 2
    return sizes


def measure_sensitivity(
    builder: VariantBuilder,
    variant: str,
    probe: Callable[[Path], np.ndarray],
    reference: np.ndarray,
    max_units: int,
) -> list[Sensitivity]:
    """Each unit of the variant's quantizable nodes quantized alone and probed; most sensitive
    first. The per-unit graphs are deleted once probed (each is nearly a whole fp32 copy)."""
    measured = []
    for index, unit in enumerate(units(builder.quantizable(variant), max_units)):
        folder = builder.build(f"sensitivity-{variant}-{index}", variant, only=unit)
        measured.append(Sensitivity(unit, kl_divergence(reference, probe(folder))))
        shutil.rmtree(folder)
    return sorted(measured, key=lambda s: -s.divergence)


def kept_for_sensitivity(ranked: Sequence[Sensitivity], k: int, rows: int) -> dict[str, str]:
    """node -> why it stays fp32, for the k most sensitive units of ranked."""
    return {
        node: (
            f"sensitivity rank {rank} of {len(ranked)}: KL {s.divergence:.3g} from fp32 when "
            f"quantized alone, on {rows} probe rows"
        )
        for rank, s in enumerate(ranked[:k], start=1)
        for node in s.nodes
    }
