"""The retrain flow run as users run it (CLI): SIGKILL mid-training, re-run, nothing new, force.

The CLI runs are processes forked from one that imported the CLI once (testkit/cli.py), on the
session's Prefect server.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.e2e


def _cli(cli, api: str, config: Path, *extra: str, wait: bool = True):
    args = ["run", "--config", str(config), *extra]
    env = {**os.environ, "PREFECT_API_URL": api}
    if not wait:
        return cli.start(args, env=env, new_session=True)
    result = cli.run(args, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout[result.stdout.index("{") :])


def test_killed_training_resumes_the_same_run_and_reruns_end_early(
    make_tiny_config, tmp_path, cli, prefect_api
):
    config = make_tiny_config(
        tmp_path, ["train.max_steps=60", "train.logging_steps=1", "train.checkpoint_steps=4"]
    )
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    checkpoints = Path(config.output_dir) / "checkpoints"

    process = _cli(cli, prefect_api, path, wait=False)
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

    resumed = _cli(cli, prefect_api, path)
    assert resumed["status"] == "completed" and resumed["run_id"] == killed.info.run_id
    run = client.get_run(killed.info.run_id)
    assert run.info.status == "FINISHED"
    assert int(run.data.tags["train.resumed_from"].split("-")[1]) >= 8
    steps = {m.step for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert steps == set(range(1, 61))
    assert [str(v.version) for v in client.search_model_versions("name='tiny-classifier'")] == ["1"]

    again = _cli(cli, prefect_api, path)
    assert again["status"] == "skipped" and again["version"] == "1"
    assert again["reason"].startswith(f"nothing new to train: run {killed.info.run_id} already")
    assert len(client.search_runs([experiment])) == 1

    forced = _cli(cli, prefect_api, path, "--force")
    assert forced["status"] == "completed" and forced["version"] == "2"
    assert forced["run_id"] != killed.info.run_id
