"""The retrain flow run as users run it (CLI): SIGKILL mid-training, re-run, nothing new, force."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]


def _cli(config: Path, *extra: str, wait: bool = True):
    command = [sys.executable, "-m", "flows.cli", "run", "--config", str(config), *extra]
    if not wait:
        return subprocess.Popen(
            command,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout[result.stdout.index("{") :])


def test_killed_training_resumes_the_same_run_and_reruns_end_early(make_tiny_config, tmp_path):
    config = make_tiny_config(
        tmp_path, ["train.max_steps=60", "train.logging_steps=1", "train.checkpoint_steps=4"]
    )
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    checkpoints = Path(config.output_dir) / "checkpoints"

    process = _cli(path, wait=False)
    deadline = time.monotonic() + 300
    while not list(checkpoints.glob("*/checkpoint-8/trainer_state.json")):
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint-8 within 300 s"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)

    client = MlflowClient(tracking_uri=config.tracking.uri, registry_uri=config.tracking.uri)
    experiment = client.get_experiment_by_name(config.tracking.experiment).experiment_id
    [killed] = client.search_runs([experiment])
    assert killed.info.status == "RUNNING"  # nobody could mark it: the process was killed
    assert client.search_registered_models() == []

    resumed = _cli(path)
    assert resumed["status"] == "completed" and resumed["run_id"] == killed.info.run_id
    run = client.get_run(killed.info.run_id)
    assert run.info.status == "FINISHED"
    assert int(run.data.tags["train.resumed_from"].split("-")[1]) >= 8
    steps = {m.step for m in client.get_metric_history(run.info.run_id, "train.loss")}
    assert steps == set(range(1, 61))
    assert [str(v.version) for v in client.search_model_versions("name='tiny-classifier'")] == ["1"]

    again = _cli(path)
    assert again["status"] == "skipped" and again["version"] == "1"
    assert again["reason"].startswith(f"nothing new to train: run {killed.info.run_id} already")
    assert len(client.search_runs([experiment])) == 1

    forced = _cli(path, "--force")
    assert forced["status"] == "completed" and forced["version"] == "2"
    assert forced["run_id"] != killed.info.run_id
