"""Sensitivity-guided mixed precision: which int8 nodes to keep in fp32 so the gates pass.

int8 breaks a transformer at a few places (an activation with outlier channels, a layer whose
errors the next ones amplify), not everywhere. So each quantizable node is quantized alone,
everything else fp32, and its effect on the outputs measured on a small probe set (mean KL
divergence of the output distributions from fp32's). The most sensitive nodes are then kept in
fp32, 1, 2, 4, ... at a time, and each such mix is scored with the full gates until one passes.

SmoothQuant where it helps (smoothing.py): every unit SmoothQuant can rewrite is measured once
more, smoothed and quantized alone; smoothing helps a unit when it at least halves that
divergence. Then the smoothed mixes come first: every unit it helps smoothed and nothing else in
fp32, then the 1, 2, 4, ... units whose best int8 form diverges most kept in fp32 (the rest that
smoothing helps smoothed), each followed by the plain fp32 mix of the same size. A smoothed node
costs one element-wise Mul; a node kept in fp32 costs an fp32 matrix product. Smoothing needs
calibration rows: a kind without them (causal_lm) gets the fp32 mixes alone.

Bounded: at most quantize.sensitivity_max_units quantize-and-probe runs (more nodes than that
are measured in runs of consecutive nodes; as many again smoothed) and quantize.mixed_max_mixes
fully scored fp32 mixes (plus at most one more smoothed mix than that).
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
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
from tasks.common.smoothing import activation_maxima, smooth_graph, smoothable

# Smoothing counts as helping a unit when its int8 divergence, smoothed, is at most this share
# of the plain one.
SMOOTHING_GAIN = 0.5


@dataclass(frozen=True)
class Sensitivity:
    """How far quantizing one unit alone (a node, or a run of consecutive nodes) moves the
    outputs: mean KL(fp32 || unit in int8) over the probe rows."""

    nodes: tuple[str, ...]
    divergence: float
    smoothed: float | None = None  # the same, SmoothQuant applied to the unit (when measured)

    @property
    def smoothing_helps(self) -> bool:
        return self.smoothed is not None and self.smoothed <= SMOOTHING_GAIN * self.divergence

    @property
    def effective(self) -> float:
        """The divergence of the unit's best int8 form (smoothed where that helps)."""
        return self.smoothed if self.smoothing_helps else self.divergence

    def as_dict(self) -> dict:
        measured = {"nodes": list(self.nodes), "kl_divergence": self.divergence}
        if self.smoothed is not None:
            measured["kl_divergence_smoothed"] = self.smoothed
        return measured


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
    _maxima: dict[str, np.ndarray] = field(default_factory=dict)
    _rows: Any = field(default=None, init=False)  # calibration(), read once

    def rows(self) -> Any:
        """The kind's calibration rows (None: it has none), read on first use and kept."""
        if self._rows is None:
            self._rows = self.calibration()
        return self._rows

    def build(
        self,
        name: str,
        variant: str,
        exclude: Sequence[str] = (),
        only: Sequence[str] = (),
        smooth: Sequence[str] = (),
    ) -> Path:
        """out_dir/variants/name: variant with the head and `exclude` in fp32 (and, when `only`
        is given, every node but those), the `smooth` nodes smoothed first (SmoothQuant), plus
        fp32's config and tokenizer files."""
        folder = self.out_dir / "variants" / name
        folder.mkdir(parents=True)
        source = self.fp32_dir
        if smooth:
            alpha = self.quantize.smooth_alpha
            source = smooth_graph(source, self.work_dir() / name, self.maxima(smooth), alpha)
        qconfig = quantization_config(variant, self.isa, [*self.head, *exclude], only)
        ranges = None
        if qconfig.is_static:  # a smoothed graph has new activations: calibrated on its own
            ranges = self._calibrated(source, variant) if smooth else self.ranges(variant)
        quantize_variant(source, folder, qconfig, ranges)
        copy_missing_files(self.fp32_dir, folder)  # config, tokenizer: a loadable folder
        if smooth:
            shutil.rmtree(source)
        return folder

    def work_dir(self) -> Path:
        work = self.out_dir / "calibration"
        work.mkdir(parents=True, exist_ok=True)
        return work

    def ranges(self, variant: str) -> Ranges:
        """The static variant's activation ranges, calibrated on first use."""
        if variant not in self._ranges:
            self._ranges[variant] = self._calibrated(self.fp32_dir, variant)
        return self._ranges[variant]

    def _calibrated(self, source: Path, variant: str) -> Ranges:
        q = self.quantize
        return calibrate(
            source,
            self.work_dir(),
            variant,
            self.isa,
            self.rows(),
            q.calibration_method,
            q.calibration_percentile,
        )

    def can_smooth(self) -> bool:
        """SmoothQuant is on (quantize.smooth_alpha) and the kind gives calibration rows."""
        return self.quantize.smooth_alpha is not None and self.rows() is not None

    def maxima(self, nodes: Sequence[str]) -> dict[str, np.ndarray]:
        """Each node's per-channel activation maxima on the calibration rows (the nodes not yet
        measured are measured together, in one pass over the rows)."""
        missing = [n for n in nodes if n not in self._maxima]
        if missing:
            model_file = self.fp32_dir / ONNX_FILE
            self._maxima |= activation_maxima(model_file, missing, self.rows(), self.work_dir())
        return {n: self._maxima[n] for n in nodes}

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


def measure_smoothing(
    builder: VariantBuilder,
    variant: str,
    ranked: Sequence[Sensitivity],
    probe: Callable[[Path], np.ndarray],
    reference: np.ndarray,
) -> list[Sensitivity]:
    """ranked, each unit whose nodes SmoothQuant can rewrite measured again, smoothed and
    quantized alone (unchanged when smoothing is off or the kind has no calibration rows)."""
    if not builder.can_smooth():
        return list(ranked)
    able = set(smoothable(builder.fp32_dir / ONNX_FILE, [n for s in ranked for n in s.nodes]))
    chosen = [s for s in ranked if set(s.nodes) <= able]
    builder.maxima([n for s in chosen for n in s.nodes])  # one pass over the calibration rows
    measured = []
    for index, unit in enumerate(ranked):
        if unit in chosen:
            folder = builder.build(
                f"smoothing-{variant}-{index}", variant, only=unit.nodes, smooth=unit.nodes
            )
            unit = replace(unit, smoothed=kl_divergence(reference, probe(folder)))
            shutil.rmtree(folder)
        measured.append(unit)
    return measured


def by_effect(ranked: Sequence[Sensitivity]) -> list[Sensitivity]:
    """The units ordered by the divergence of their best int8 form, largest first."""
    return sorted(ranked, key=lambda s: -s.effective)


def smoothed_for_sensitivity(
    units: Sequence[Sensitivity], rows: int, alpha: float | None
) -> dict[str, str]:
    """node -> why, for the units that smoothing helps."""
    return {
        node: (
            f"SmoothQuant (alpha {alpha:g}): KL {s.divergence:.3g} -> {s.smoothed:.3g} from "
            f"fp32 when quantized alone, on {rows} probe rows"
        )
        for s in units
        if s.smoothing_helps
        for node in s.nodes
    }


def kept_for_sensitivity(
    ranked: Sequence[Sensitivity], k: int, rows: int, smoothed: bool = False
) -> dict[str, str]:
    """node -> why it stays fp32, for the k most sensitive units of ranked (with smoothed,
    ranked is by_effect's order and the KL is that of the unit's best int8 form)."""
    after = " after smoothing where it helps" if smoothed else ""
    return {
        node: (
            f"sensitivity rank {rank} of {len(ranked)}{after}: KL "
            f"{s.effective if smoothed else s.divergence:.3g} from fp32 when quantized alone, "
            f"on {rows} probe rows"
        )
        for rank, s in enumerate(ranked[:k], start=1)
        for node in s.nodes
    }
