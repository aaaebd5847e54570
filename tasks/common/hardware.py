"""What this CPU can do: its feature flags, whether it has bf16 matrix kernels, its peak FLOP/s.

Read from Linux's /proc/cpuinfo; elsewhere the flags are empty and every choice falls back to
what any x86-64 or ARM CPU runs (fp32). The peak figures are the textbook per-core, per-cycle
numbers times cores times the reported clock: an upper bound that the benchmarks hold the
measured figures against, not a promise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

CPUINFO = Path("/proc/cpuinfo")

# dense FLOPs per cycle per core (a multiply-add counts 2): AVX-512 with two FMA ports does
# 32 fp32 multiply-adds, AVX2 16; AVX512-BF16 (vdpbf16ps) 64 bf16 ones; an AMX tile unit 512.
FP32_FLOPS_PER_CYCLE = {"avx512f": 64, "avx2": 32}
BF16_FLOPS_PER_CYCLE = {"amx_bf16": 1024, "avx512_bf16": 128}
# int8 multiply-adds x 2 per cycle per core: AMX-INT8 tiles, AVX-512 VNNI (vpdpbusd on 2 ports);
# without VNNI, onnxruntime's u8s8 kernels multiply with vpmaddubsw (2 ports), 512 or 256 bits wide
INT8_OPS_PER_CYCLE = {"amx_int8": 2048, "avx512_vnni": 256, "avx512bw": 256, "avx2": 128}
AVX512_FLAGS = ("avx512f", "avx512_bf16", "avx512_vnni", "avx512bw")
# (vendor, cpu family) that run 512-bit instructions as two 256-bit halves: AMD Zen 4 (family
# 25 with AVX-512; Zen 3, also family 25, has none). Their AVX-512 peak is half the table's.
HALF_WIDTH_AVX512 = {("AuthenticAMD", "25")}


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty where unknown."""
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def bf16_kernels(flags: set[str] | None = None) -> str | None:
    """The CPU's fastest bf16 matrix instructions (amx_bf16, avx512_bf16), or None without them.

    With either, PyTorch's oneDNN runs bf16 matmuls natively: bf16 autocast is faster than fp32.
    Without them bf16 is emulated and slower, so fp32 is the right choice there."""
    flags = cpu_flags() if flags is None else flags
    return next((name for name in BF16_FLOPS_PER_CYCLE if name in flags), None)


def cpu_field(name: str, cpuinfo: str | None = None) -> str | None:
    """A /proc/cpuinfo field of the first CPU (vendor_id, cpu family, ...), None where unknown."""
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text()
        except OSError:
            return None
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return None


def cpu_clock_ghz(cpuinfo: str | None = None) -> float | None:
    """The clock /proc/cpuinfo reports for the first CPU (GHz), None where unknown."""
    mhz = cpu_field("cpu MHz", cpuinfo)
    return float(mhz) / 1000 if mhz else None


@dataclass(frozen=True)
class PeakFlops:
    """This CPU's dense peak, for the cores a process may use (FLOP/s; None where unknown)."""

    cores: int
    clock_ghz: float | None
    fp32: float | None
    bf16: float | None
    int8: float | None = None

    @property
    def clock_text(self) -> str:
        """The clock for a report ("2.60 GHz"; /proc/cpuinfo gives it as 2599.998 MHz)."""
        return "an unknown clock" if self.clock_ghz is None else f"{self.clock_ghz:.2f} GHz"

    def share(self, flops_per_second: float, precision: str) -> float | None:
        """The share of the peak (fp32, bf16 or int8) that a measured (FL)OP/s reaches."""
        peak = {"bf16": self.bf16, "int8": self.int8}.get(precision, self.fp32)
        return flops_per_second / peak if peak else None


def peak_flops(flags: set[str] | None = None, cpuinfo: str | None = None) -> PeakFlops:
    """Cores x clock x per-cycle FLOPs of the best fp32, bf16 and int8 instructions it has
    (half the AVX-512 rate on CPUs that split 512-bit instructions, HALF_WIDTH_AVX512)."""
    flags = cpu_flags(cpuinfo) if flags is None else flags
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    clock = cpu_clock_ghz(cpuinfo)

    half = (cpu_field("vendor_id", cpuinfo), cpu_field("cpu family", cpuinfo)) in HALF_WIDTH_AVX512

    def peak(table: dict[str, int]) -> float | None:
        name, per_cycle = next(((n, c) for n, c in table.items() if n in flags), (None, None))
        if half and name in AVX512_FLAGS:
            per_cycle //= 2
        return cores * clock * 1e9 * per_cycle if per_cycle and clock else None

    return PeakFlops(
        cores or 1,
        clock,
        peak(FP32_FLOPS_PER_CYCLE),
        peak(BF16_FLOPS_PER_CYCLE),
        peak(INT8_OPS_PER_CYCLE),
    )


def fmt_flops(value: float | None) -> str:
    """A FLOP/s figure for a report: GFLOP/s, or "unknown" (no such instructions, no clock)."""
    return "unknown" if value is None else f"{value / 1e9:.0f} GFLOP/s"


def flops_per_token(model: torch.nn.Module, seq_len: float, training: bool = False) -> float:
    """Dense FLOPs one token costs in `model`: 2 per weight of every Linear layer (embeddings
    are lookups) plus the attention scores and mixing, 4 x seq_len x hidden per layer.

    training=True counts LoRA training: forward plus the backward's input gradients through
    every frozen matmul (as much again); the adapter's own weight gradients are negligible."""
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    config = getattr(model, "config", None)
    layers = getattr(config, "num_hidden_layers", 0)
    hidden = getattr(config, "hidden_size", 0)
    forward = 2 * linear + 4 * layers * seq_len * hidden
    return 2 * forward if training else forward
