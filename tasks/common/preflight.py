"""Checks that need this machine, made once before a run claims anything.

A device the config asks for and this machine lacks would otherwise fail only in the stage
that uses it (training an hour in, or the serving check after export).
"""

from __future__ import annotations

import onnxruntime as ort
import torch

from tasks.common.config import PipelineConfig, load_config
from tasks.common.errors import ConfigError
from tasks.common.onnx import CUDA
from tasks.common.tracking import probe_server, tracking_uri


def training_device_available(device: str) -> bool:
    if device == "cuda":
        return torch.cuda.is_available()
    if device == "mps":
        return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return True


def check_devices(config: PipelineConfig) -> None:
    """train.device (when training runs here) and serve.device must exist on this machine."""
    device = config.train.device
    if config.train.deployment is None and not training_device_available(device):
        raise ConfigError(
            f"train.device is {device} but torch sees no {device} device on this machine: set "
            f"train.device to auto or cpu, or send training to a GPU worker with "
            f"train.deployment (e.g. lora-train/gpu)"
        )
    if config.serve.device == "cuda" and CUDA not in ort.get_available_providers():
        raise ConfigError(
            f"serve.device is cuda but this onnxruntime offers only "
            f"{', '.join(ort.get_available_providers())}: install onnxruntime-gpu with a "
            f"matching CUDA, or set serve.device to auto or cpu"
        )


def check_before_prefect(config_path: str, overrides: list[str]) -> None:
    """What the CLI checks before it starts Prefect's temporary server (about 10 s here): the
    config, the devices and a tracking server that never answers are reported at once, and the
    flow checks them again where it runs."""
    config = load_config(config_path, overrides)
    check_devices(config)
    probe_server(tracking_uri(config.tracking))
