"""Checks before a stage writes: the output folder is writable and has room for the outputs."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from tasks.common.errors import PipelineError

MB = 2**20

# Output size per stage, in base-model sizes (fp32 weights), with room to spare.
NEED_IN_MODEL_SIZES = {
    "data": 0.1,
    "adapter": 0.3,
    "evaluation": 0.05,
    "merged_model": 1.2,
    "onnx": 1.2,
    "quantized": 2.0,
    "serving_model": 1.0,
}


def folder_size_mb(path: str | Path, pattern: str = "*.safetensors") -> float:
    """Size of the matching files in a folder (0 where it is not a local folder)."""
    folder = Path(path)
    return sum(f.stat().st_size for f in folder.glob(pattern)) / MB if folder.is_dir() else 0.0


def ensure_room(folder: Path, need_mb: float, stage: str, setting: str = "output_dir") -> Path:
    """Create folder, prove it is writable and has need_mb free; clear error otherwise.
    `setting` is the config key that moves the folder (named in the fix)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise PipelineError(
            f"{stage}: output folder {folder} is not writable ({exc.strerror or exc}); set "
            f"{setting} to a folder you can write to"
        ) from None
    free_mb = shutil.disk_usage(folder).free / MB
    if free_mb < need_mb:
        raise PipelineError(
            f"{stage}: not enough disk space in {folder}: {free_mb:.0f} MB free, about "
            f"{need_mb:.0f} MB needed; free some space or point {setting} at a larger disk"
        )
    return folder


def need_mb(name: str, model_mb: float) -> float:
    """Room a stage output needs: a share of the base model's size, plus 10 MB."""
    return 10 + NEED_IN_MODEL_SIZES.get(name, 1.0) * max(model_mb, 100.0)


def tidy(config, folder: Path) -> None:
    """Remove a working folder whose contents are safe in the artifact store, unless
    output.keep (a folder already gone is fine)."""
    if not config.output.keep:
        shutil.rmtree(folder, ignore_errors=True)


def run_folder(config, run_id: str) -> Path:
    """output_dir/<run id>: every stage's working copy for one MLflow run."""
    return Path(config.output_dir) / run_id
