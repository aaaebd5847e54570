"""What the serve_check stage of every kind shares, and the folder a model serves from.

The serving folder holds the chosen ONNX file, its tokenizer and serving.json, which tells the
kind's pyfunc how to answer: the ONNX file, the variant, the device and the onnxruntime session
config entries, plus what the kind adds (label names, max length and batch size for
classification; the default number of new tokens for causal_lm).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
from pathlib import Path

import torch

from tasks.common.config import PipelineConfig
from tasks.common.onnx import SERVED_FILE, session_config
from tasks.common.plots import save_figure
from tasks.common.storage import run_folder

SPEC_FILE = "serving.json"


def pinned(packages: list[str]) -> list[str]:
    """`package==version` as installed here, so the served model gets what was checked.
    onnxruntime is pinned as whichever build is installed (onnxruntime-gpu on GPU machines)."""
    pins = []
    for name in packages:
        if name == "onnxruntime" and not _installed(name) and _installed("onnxruntime-gpu"):
            name = "onnxruntime-gpu"
        version = importlib.metadata.version(name).split("+")[0] if _installed(name) else None
        pins.append(f"{name}=={version}" if version else name)  # 2.13.0+cpu: ==2.13.0 matches
    return pins


def _installed(name: str) -> bool:
    try:
        importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def serving_spec(config: PipelineConfig, variant: str, kind_spec: dict) -> dict:
    """serving.json: the ONNX file, its variant, the device, the onnxruntime session config
    entries the checks ran with, and what the kind adds."""
    return {
        "task": config.task,
        "model_file": SERVED_FILE,
        "variant": variant,
        "device": "cuda" if config.serve.device == "cuda" else "cpu",
        "session_config": session_config(config.serve.device),
        **kind_spec,
    }


def build_serving_folder(quantized_dir: Path, out_dir: Path, spec: dict) -> Path:
    """Copy the served ONNX file with its tokenizer and config files; write serving.json."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    for item in quantized_dir.iterdir():
        if item.is_file() and (item.suffix != ".onnx" or item.name == SERVED_FILE):
            shutil.copy2(item, out_dir / item.name)
    (out_dir / SPEC_FILE).write_text(json.dumps(spec, indent=2))
    return out_dir


def serving_threads(config: PipelineConfig) -> int:
    """serve.num_threads (0: every core), set for PyTorch too: both engines get the same."""
    threads = config.serve.num_threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    return threads


def log_serve_check(stage, metrics: dict, timings: dict, figure, tags: dict) -> None:
    """The served model's metrics (serve/<metric>), both engines' timings, the latency plot
    (plots/serving_latency.png) and the serving tags."""
    run = stage.run
    run.log_metrics({f"serve/{k}": v for k, v in metrics.items()} | timings)
    path = run_folder(stage.config, run.run_id) / "plots" / "serving_latency.png"
    run.log_artifact(save_figure(figure, path), "plots")
    run.set_tags(tags)
