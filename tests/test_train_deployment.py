"""Training in-process or on the `lora-train` deployment: same adapter, moved through MLflow.

`run_deployment` is replaced by a stand-in that runs the real `lora-train` flow in this process,
with the worker's output folder elsewhere, so the data and the adapter must travel through the
MLflow artifact store. tests/test_production.py runs the real thing on real servers.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from mlflow.tracking import MlflowClient
from prefect.exceptions import ObjectNotFound
from prefect.states import Completed, Failed

import flows.train as train_module
from flows.retrain import retrain_flow
from flows.train import RESULT_ARTIFACT, WORKER_OUTPUT_DIR_ENV, train_flow
from tasks.common.errors import ConfigError, TrainingError

DEPLOYMENT = "lora-train/gpu"


@pytest.fixture(scope="module", autouse=True)
def _send_flow_logs_while_the_api_is_up():
    """Failed in-process flows leave logs queued; unsent, they stall the exit by a minute."""
    yield
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()


def _write_config(tmp: Path, make_tiny_config, overrides=()) -> Path:
    config = make_tiny_config(tmp, list(overrides))
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return path


class FakeDeploymentRunner:
    """Stands in for prefect.deployments.run_deployment: runs lora-train here, as a worker would."""

    def __init__(self, worker_dir: Path):
        self.worker_dir = worker_dir
        self.calls: list[dict] = []

    def __call__(self, name, parameters, timeout, **kwargs):
        wire = json.loads(json.dumps(parameters))  # what crosses to a worker: plain JSON only
        self.calls.append({"name": name, "parameters": wire, "timeout": timeout, **kwargs})
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(WORKER_OUTPUT_DIR_ENV, str(self.worker_dir))
            record = train_flow(**wire)
        return SimpleNamespace(
            id=record["prefect_flow_run_id"], name="fake-gpu-run", state=Completed()
        )


@pytest.fixture(scope="module")
def both_paths(tmp_path_factory, make_tiny_config):
    """The same tiny config trained in-process and through the (stand-in) gpu deployment."""
    local_tmp = tmp_path_factory.mktemp("in-process")
    local = retrain_flow(str(_write_config(local_tmp, make_tiny_config)))
    remote_tmp = tmp_path_factory.mktemp("deployed")
    runner = FakeDeploymentRunner(remote_tmp / "worker")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module, "run_deployment", runner)
        remote = retrain_flow(  # output.keep: the tests look into both working folders
            str(_write_config(remote_tmp, make_tiny_config)),
            [f"train.deployment={DEPLOYMENT}", "output.keep=true"],
        )
    return SimpleNamespace(
        local=local, local_tmp=local_tmp, remote=remote, remote_tmp=remote_tmp, runner=runner
    )


def test_a_finished_run_leaves_no_working_folder_unless_kept(both_paths):
    outputs = both_paths.local_tmp / "outputs"
    assert not (outputs / both_paths.local["run_id"]).exists()  # all of it is in MLflow
    assert not (outputs / "checkpoints" / both_paths.local["run_id"]).exists()
    assert (both_paths.remote_tmp / "outputs" / both_paths.remote["run_id"]).is_dir()  # kept


def _client(tmp: Path) -> MlflowClient:
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_in_process_training_needs_no_deployment(both_paths):
    client = _client(both_paths.local_tmp)
    run = client.get_run(both_paths.local["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["train.deployment"] == "None"
    assert "train.prefect_flow_run_id" not in run.data.tags
    assert "train" not in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert both_paths.local["promoted"] and both_paths.local["version"] == "1"


def test_the_deployment_gets_only_ids_and_plain_values(both_paths):
    (call,) = both_paths.runner.calls
    assert call["name"] == DEPLOYMENT and call["timeout"] is None
    params = call["parameters"]
    assert set(params) == {"run_id", "config", "data"}
    assert params["run_id"] == both_paths.remote["run_id"]
    assert params["data"]["dataset_artifact_path"] == "data"
    assert str(both_paths.remote_tmp) not in json.dumps(params["data"])  # no local paths
    assert params["config"]["train"]["deployment"] == DEPLOYMENT
    assert call["idempotency_key"] == f"lora-train-{params['run_id']}"


def test_data_and_adapter_travel_through_the_artifact_store(both_paths):
    run_id = both_paths.remote["run_id"]
    worker = both_paths.remote_tmp / "worker" / run_id
    pipeline = both_paths.remote_tmp / "outputs" / run_id
    # the worker downloaded the tokenized data, the pipeline downloaded the adapter
    assert (worker / "data" / "tokenized" / "dataset_dict.json").is_file()
    assert (worker / "adapter" / "adapter_model.safetensors").is_file()
    assert (pipeline / "adapter" / "adapter_model.safetensors").read_bytes() == (
        worker / "adapter" / "adapter_model.safetensors"
    ).read_bytes()


def test_deployed_training_is_recorded_and_equals_in_process_training(both_paths):
    client = _client(both_paths.remote_tmp)
    run = client.get_run(both_paths.remote["run_id"])
    assert run.info.status == "FINISHED"
    record = json.loads(
        Path(client.download_artifacts(run.info.run_id, RESULT_ARTIFACT)).read_text()
    )
    assert run.data.tags["train.prefect_flow_run_id"] == record["prefect_flow_run_id"]
    assert record["adapter_artifact_path"] == "adapter" and record["device"] == "cpu"
    (final_loss,) = client.get_metric_history(run.info.run_id, "train/final_loss")
    assert record["global_steps"] == final_loss.step > 0
    local_metrics = _client(both_paths.local_tmp).get_run(both_paths.local["run_id"]).data.metrics
    for key in ("train/final_loss", "test/accuracy", "test/macro_f1"):
        assert run.data.metrics[key] == pytest.approx(local_metrics[key], abs=1e-6), key
    assert both_paths.remote["promoted"] and both_paths.remote["version"] == "1"


@pytest.mark.parametrize(
    "outcome, error, message",
    [
        (
            Failed(message="Flow run encountered an exception: RuntimeError: CUDA out of memory"),
            TrainingError,
            "ended in Failed: Flow run encountered an exception: RuntimeError: CUDA out of memory",
        ),
        (
            ObjectNotFound(http_exc=None),
            ConfigError,
            f"train.deployment {DEPLOYMENT!r} not found on the Prefect server",
        ),
    ],
)
def test_a_failed_or_missing_training_deployment_fails_the_run_clearly(
    tmp_path, make_tiny_config, monkeypatch, outcome, error, message
):
    def run_deployment(name, parameters, timeout, **kwargs):
        if isinstance(outcome, Exception):
            raise outcome
        return SimpleNamespace(id=uuid.uuid4(), name="doomed-run", state=outcome)

    monkeypatch.setattr(train_module, "run_deployment", run_deployment)
    config = _write_config(tmp_path, make_tiny_config)
    with pytest.raises(error) as raised:
        retrain_flow(str(config), [f"train.deployment={DEPLOYMENT}"])
    assert message in str(raised.value)
    client = _client(tmp_path)
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert run.info.status == "FAILED"
    assert client.search_registered_models() == []
