"""The MLflow tracking server goes away for ~10 s mid-run: the run still completes, nothing lost."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tasks.common.served_model import free_port
from testkit.servers import mlflow_server

pytestmark = pytest.mark.e2e
OUTAGE_SECONDS = 10


def _mlflow_server(store: Path, port: int, env: dict):
    return mlflow_server(store, port, env)


def _stop(server) -> None:
    server.stop()


def test_run_survives_a_tracking_server_outage(make_tiny_config, tmp_path, cli):
    store, port = tmp_path / "store", free_port()
    store.mkdir()
    uri = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    config = make_tiny_config(
        tmp_path,
        [
            f"tracking.uri={uri}",
            "tracking.artifact_location=null",
            "train.max_steps=40",
            "train.logging_steps=1",
        ],
    )
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    server = _mlflow_server(store, port, env)
    # a process forked from one that imported the CLI once (testkit/cli.py)
    run = cli.start(["run", "--config", str(path)], env=env, new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not list(Path(config.output_dir).glob("checkpoints/*")):  # training has started
            assert run.poll() is None, run.output()[1][-3000:]
            assert time.monotonic() < deadline, "training did not start in 300 s"
            time.sleep(0.1)
        _stop(server)
        time.sleep(OUTAGE_SECONDS)
        server = _mlflow_server(store, port, env)  # the results are read through it below
        out, err = run.communicate(timeout=600)
    except BaseException:
        _stop(server)
        raise
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    try:
        assert run.returncode == 0, err[-3000:]
        result = json.loads(out[out.index("{") :])
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        finished = client.get_run(result["run_id"])
        assert finished.info.status == "FINISHED"
        steps = {m.step for m in client.get_metric_history(result["run_id"], "train/loss")}
        assert steps == set(range(1, 41))  # no logged step lost in the outage
        artifacts = {a.path for a in client.list_artifacts(result["run_id"])}
        assert {
            "data",
            "adapter",
            "merged_model",
            "onnx",
            "quantized",
            "model",
            "promotion",
        } <= artifacts or {
            "data",
            "adapter",
            "merged_model",
            "onnx",
            "quantized",
            "promotion",
        } <= artifacts
        versions = client.search_model_versions("name='tiny-classifier'")
        assert [str(v.version) for v in versions] == [result["version"]] == ["1"]
    finally:
        _stop(server)
