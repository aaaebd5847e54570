"""Plots the stages log: serving latency of both engines, and saving a figure."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ENGINE_LABELS = {"torch": "PyTorch fp32 eager"}


def engine_figure(
    timings: dict[str, float],
    variant: str,
    left: tuple[str, list[str], list[str]],
    right: tuple[str, list[str], list[str]],
):
    """Two bar panels comparing onnxruntime and PyTorch.

    Each panel is (y label, tick labels, timing keys with {engine} in them): one bar group
    per tick, one bar per engine.
    """
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.38
    labels = {"onnx": f"onnxruntime ({variant})", **ENGINE_LABELS}
    for ax, (ylabel, ticks, keys) in zip(axes, (left, right), strict=True):
        for i, engine in enumerate(("onnx", "torch")):
            values = [timings[key.format(engine=engine)] for key in keys]
            ax.bar(np.arange(len(keys)) + i * width, values, width, label=labels[engine])
        ax.set_xticks(np.arange(len(keys)) + width / 2, ticks)
        ax.set_ylabel(ylabel)
    axes[0].legend()
    fig.tight_layout()
    return fig


def save_figure(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
