"""Checks before a stage writes: the output folder is writable and has room for the outputs."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from tasks.errors import PipelineError

MB = 2**20


def folder_size_mb(path: str | Path, pattern: str = "*.safetensors") -> float:
    """Size of the matching files in a folder (0 where it is not a local folder)."""
    folder = Path(path)
    return sum(f.stat().st_size for f in folder.glob(pattern)) / MB if folder.is_dir() else 0.0


def ensure_room(folder: Path, need_mb: float, stage: str) -> Path:
    """Create folder, prove it is writable and has need_mb free; clear error otherwise."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise PipelineError(
            f"{stage}: output folder {folder} is not writable ({exc.strerror or exc}); set "
            f"output_dir to a folder you can write to"
        ) from None
    free_mb = shutil.disk_usage(folder).free / MB
    if free_mb < need_mb:
        raise PipelineError(
            f"{stage}: not enough disk space in {folder}: {free_mb:.0f} MB free, about "
            f"{need_mb:.0f} MB needed; free some space or point output_dir at a larger disk"
        )
    return folder


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


def stage_dir(config, run_id: str, name: str) -> Path:
    """The stage's output folder under output_dir/run_id, checked for access and free space."""
    from tasks.modeling import resolve_model_path

    model_mb = max(folder_size_mb(resolve_model_path(config.model.name_or_path)), 100.0)
    need_mb = 10 + NEED_IN_MODEL_SIZES.get(name, 1.0) * model_mb
    return ensure_room(Path(config.output_dir) / run_id / name, need_mb, name)
