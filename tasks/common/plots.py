"""Plots the stages log: serving latency of both engines, and saving a figure."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ENGINE_LABELS = {"torch": "PyTorch fp32 eager", "torch_bf16": "PyTorch bf16 autocast"}
ENGINES = ("onnx", "torch", "torch_bf16")  # the order of the bars


def engine_figure(
    timings: dict[str, float],
    variant: str,
    left: tuple[str, list[str], list[str]],
    right: tuple[str, list[str], list[str]],
):
    """Two bar panels comparing onnxruntime and PyTorch (fp32, and bf16 where it was timed).

    Each panel is (y label, tick labels, timing keys with {engine} in them): one bar group
    per tick, one bar per engine that has every key.
    """
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    labels = {"onnx": f"onnxruntime ({variant})", **ENGINE_LABELS}
    for ax, (ylabel, ticks, keys) in zip(axes, (left, right), strict=True):
        engines = [e for e in ENGINES if all(k.format(engine=e) in timings for k in keys)]
        width = 0.8 / len(engines)
        for i, engine in enumerate(engines):
            values = [timings[key.format(engine=engine)] for key in keys]
            ax.bar(np.arange(len(keys)) + i * width, values, width, label=labels[engine])
        ax.set_xticks(np.arange(len(keys)) + width * (len(engines) - 1) / 2, ticks)
        ax.set_ylabel(ylabel)
    axes[0].legend()
    fig.tight_layout()
    return fig


def save_figure(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
