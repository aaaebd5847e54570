"""Faults and bad environments: unreachable tracking, unwritable output, full disk."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest

from tasks.common.errors import PipelineError
from tasks.common.storage import ensure_room
from tasks.common.tracking import start_pipeline_run

ROOT = Path(__file__).resolve().parents[1]


def test_unreachable_tracking_server_is_a_clear_cli_error(tmp_path):
    env = {
        "PATH": str(Path(sys.executable).parent),
        "HOME": str(tmp_path),
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "run",
            "--set",
            "tracking.uri=http://127.0.0.1:9",
            "--set",
            f"output_dir={tmp_path / 'out'}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "temporary server" not in result.stderr  # told before Prefect's server starts
    assert (
        "error: MLflow tracking server http://127.0.0.1:9 cannot be reached (after 1 retries): "
        "start it, or fix tracking.uri / MLFLOW_TRACKING_URI"
    ) in result.stderr
    assert "Traceback" not in result.stderr


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(PipelineError) as err:
        ensure_room(blocker / "run" / "data", 1, "data")
    assert str(err.value).startswith(
        f"data: output folder {blocker / 'run' / 'data'} is not writable ("
    )
    assert str(err.value).endswith("); set output_dir to a folder you can write to")


def test_too_little_disk_space_is_checked_before_writing(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 * 2**20, 9 * 2**20, 2**20))
    with pytest.raises(PipelineError) as err:
        ensure_room(tmp_path / "onnx", 120, "onnx")
    assert str(err.value) == (
        f"onnx: not enough disk space in {tmp_path / 'onnx'}: 1 MB free, about "
        "120 MB needed; free some space or point output_dir at a larger disk"
    )


def test_a_stage_refuses_to_start_without_room(make_tiny_config, tmp_path, monkeypatch):
    from tasks.stages import prepare_data

    config = make_tiny_config(tmp_path)
    run_id = start_pipeline_run(config)
    usage = namedtuple("usage", "total used free")
    real = shutil.disk_usage
    full = str(Path(config.output_dir))  # only the stage's output disk is full

    def disk_usage(path):
        return usage(10 * 2**20, 10 * 2**20, 0) if str(path).startswith(full) else real(path)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    with pytest.raises(
        PipelineError, match=r"^data: not enough disk space in .*: 0 MB free, about 20 MB needed"
    ):
        prepare_data(config, run_id)
    assert not (Path(config.output_dir) / run_id / "data" / "tokenized").exists()
