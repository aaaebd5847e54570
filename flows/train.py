"""The training flow alone (`lora-train`), deployable to the `gpu` work pool.

The retrain flow hands training here through `run_deployment` when `train.deployment` is set.
Only ids, URIs and plain values cross over: the tokenized data comes from the pipeline's MLflow
run, and the adapter plus a record of how it was trained (`train/result.json`) go back to it,
so this flow runs on any machine that reaches the tracking server and its artifact store.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mlflow.artifacts import load_dict
from mlflow.exceptions import MlflowException
from prefect import flow, get_client, get_run_logger, tags
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.states import Cancelling

from tasks.common.config import PipelineConfig, config_from_dict
from tasks.common.credentials import load_credentials, redact, scrubbed
from tasks.common.errors import ConfigError, TrainingError
from tasks.common.storage import run_folder, tidy
from tasks.common.tracking import ArtifactRef, Tracking, prefect_flow_run_id
from tasks.records import PreparedData, TrainedAdapter
from tasks.stages import run_trial_task, train_lora_task

# Where the training flow writes on its worker. Unset: the config's output_dir. A folder
# other than the pipeline's makes the worker download its inputs from the artifact store.
WORKER_OUTPUT_DIR_ENV = "LORA_TRAIN_OUTPUT_DIR"
RESULT_ARTIFACT = "train/result.json"
GPU_TAG = "gpu"  # on the train-lora task run when it ran on the gpu pool (lora-train flow)


def data_parameters(data: PreparedData) -> dict[str, Any]:
    """PreparedData as plain values: the tokenized data is named by its artifact path."""
    return {
        "dataset_artifact_path": data.dataset.artifact_path,
        "rows": dict(data.rows),
        "content_sha256": data.content_sha256,
        "dropped": dict(data.dropped),
    }


def data_from_parameters(data: dict[str, Any], run_id: str, output_dir: str) -> PreparedData:
    """PreparedData whose dataset folder is fetched into this machine's output_dir."""
    artifact_path = data["dataset_artifact_path"]
    local = Path(output_dir) / run_id / Path(artifact_path).name
    return PreparedData(
        dataset=ArtifactRef(run_id=run_id, artifact_path=artifact_path, local_path=str(local)),
        rows=dict(data["rows"]),
        content_sha256=data["content_sha256"],
        dropped=dict(data.get("dropped", {})),
    )


def trained_record(trained: TrainedAdapter, flow_run_id: str) -> dict[str, Any]:
    """TrainedAdapter as plain values (the adapter is named by its artifact path)."""
    record = asdict(trained)
    record["adapter_artifact_path"] = record.pop("adapter")["artifact_path"]
    record["prefect_flow_run_id"] = flow_run_id
    return record


def trained_from_record(record: dict[str, Any], run_id: str, output_dir: str) -> TrainedAdapter:
    """TrainedAdapter whose adapter folder is fetched into this machine's output_dir."""
    artifact_path = record["adapter_artifact_path"]
    local = Path(output_dir) / run_id / Path(artifact_path).name
    return TrainedAdapter(
        adapter=ArtifactRef(run_id=run_id, artifact_path=artifact_path, local_path=str(local)),
        device=record["device"],
        precision=record["precision"],
        trainable_params=int(record["trainable_params"]),
        total_params=int(record["total_params"]),
        global_steps=int(record["global_steps"]),
        chosen=dict(record.get("chosen", {})),
    )


def _require_run(tracking: Tracking, run_id: str) -> None:
    try:
        tracking.client.get_run(run_id)
    except MlflowException as exc:
        raise ConfigError(
            f"MLflow run {run_id} not found at {redact(tracking.uri)}: this worker "
            f"must use the pipeline's tracking server (set MLFLOW_TRACKING_URI on the worker, "
            f"or tracking.uri in the config)"
        ) from exc


@flow(name="lora-train", log_prints=True)
def train_flow(
    run_id: str,
    config: dict[str, Any],
    data: dict[str, Any],
    output_dir: str | None = None,
    trial: bool = False,
) -> dict[str, Any]:
    """Train a LoRA adapter for the pipeline's MLflow run `run_id`; return the training record.

    `config` is the resolved pipeline config, `data` the plain values of PreparedData.
    `output_dir` (else $LORA_TRAIN_OUTPUT_DIR, else the config's) is this worker's folder.
    With `trial`, run one trial of the run's search instead (tasks/search/trial.py) and return
    how it ended.
    """
    pipeline_config = config_from_dict(config, source="lora-train parameter `config`")
    load_credentials(pipeline_config.tracking)
    local_dir = output_dir or os.environ.get(WORKER_OUTPUT_DIR_ENV) or pipeline_config.output_dir
    pipeline_config = pipeline_config.model_copy(update={"output_dir": local_dir})
    tracking = Tracking.connect(pipeline_config.tracking)
    _require_run(tracking, run_id)
    prepared = data_from_parameters(data, run_id, local_dir)
    if trial:
        with tags(GPU_TAG):
            outcome = run_trial_task(pipeline_config, prepared, run_id)
        tidy(pipeline_config, run_folder(pipeline_config, run_id))
        return asdict(outcome)
    with tags(GPU_TAG):  # this flow is what the gpu pool runs: its task says so
        trained = train_lora_task(pipeline_config, prepared, run_id)
    flow_run_id = prefect_flow_run_id()
    record = trained_record(trained, flow_run_id)
    run = tracking.run(run_id)
    run.log_json(record, RESULT_ARTIFACT)
    run.set_tags({"train.prefect_flow_run_id": flow_run_id})
    tidy(pipeline_config, run_folder(pipeline_config, run_id))  # this worker's copy is logged
    get_run_logger().info(
        "run %s: trained on %s (%s), %d steps; adapter logged as %s",
        run_id,
        trained.device,
        trained.precision,
        trained.global_steps,
        record["adapter_artifact_path"],
    )
    return record


def start_node_runs(config: PipelineConfig, data: PreparedData, run_id: str) -> list:
    """One `lora-train` flow run per node (train.distributed.nnodes), the same parameters for
    each: their launchers meet in the rendezvous named after the run. One node: wait for it."""
    nnodes = config.train.distributed.nnodes
    try:
        return [
            run_deployment(
                name=config.train.deployment,
                parameters={
                    "run_id": run_id,
                    "config": scrubbed(config.model_dump(mode="json")),  # no URL credentials
                    "data": data_parameters(data),
                },
                timeout=None if nnodes == 1 else 0,  # None: however long the queue takes
                poll_interval=2,
                idempotency_key=f"lora-train-{run_id}" + (f"-node{k}" if nnodes > 1 else ""),
                tags=["lora-retrain", f"mlflow-run:{run_id}"]
                + ([f"node:{k}/{nnodes}"] if nnodes > 1 else []),
            )
            for k in range(nnodes)
        ]
    except ObjectNotFound as exc:
        raise ConfigError(
            f"train.deployment {config.train.deployment!r} not found on the Prefect server: "
            f"create it with `prefect deploy --all`, or unset train.deployment to train "
            f"in-process"
        ) from exc


def wait_for_nodes(runs: list, name: str) -> list:
    """Wait until every node's flow run is final; when one fails, cancel the others (they
    would wait for the failed node until their join timeout) and raise. Leaving this wait
    in any other way (the retrain run is cancelled) cancels them too: no rank is left."""
    with get_client(sync_client=True) as client:
        try:
            while True:
                runs = [client.read_flow_run(run.id) for run in runs]
                failed = [r for r in runs if r.state.is_final() and not r.state.is_completed()]
                if failed or all(r.state.is_completed() for r in runs):
                    break
                time.sleep(2)
        finally:
            for run in runs:
                if not client.read_flow_run(run.id).state.is_final():
                    client.set_flow_run_state(
                        run.id, Cancelling(message="a node ended"), force=True
                    )
    if failed:
        started = sum(r.start_time is not None for r in runs)
        raise node_failure(failed[0], name, f"; {started} of {len(runs)} node flow runs started")
    return runs


def node_failure(child, name: str, more: str = "") -> TrainingError:
    state = child.state
    state_name = state.name if state is not None else "an unknown state"
    message = (state.message or "").strip() if state is not None else ""
    return TrainingError(
        f"training flow run {child.name!r} ({child.id}) on deployment {name!r} ended in "
        f"{state_name}" + (f": {message}" if message else "") + more + "; see its logs in the "
        "Prefect UI"
    )


def train_on_deployment(config: PipelineConfig, data: PreparedData, run_id: str) -> TrainedAdapter:
    """Run `lora-train` on the deployment `train.deployment` (once per node), wait, fetch the
    adapter."""
    name = config.train.deployment
    logger = get_run_logger()
    logger.info("handing training of run %s to deployment %s", run_id, name)
    runs = start_node_runs(config, data, run_id)
    if len(runs) > 1:
        runs = wait_for_nodes(runs, name)
    child = runs[0]
    if child.state is None or not child.state.is_completed():
        raise node_failure(child, name)
    run = Tracking.connect(config.tracking).run(run_id)
    try:
        with run.tracking.fluent():
            record = load_dict(f"runs:/{run_id}/{RESULT_ARTIFACT}")
    except MlflowException as exc:
        raise TrainingError(
            f"training flow run {child.name!r} completed but run {run_id} has no "
            f"{RESULT_ARTIFACT}: the worker logged to another MLflow server (check "
            f"MLFLOW_TRACKING_URI on the {name!r} workers)"
        ) from exc
    trained = trained_from_record(record, run_id, config.output_dir)
    adapter_dir = run.fetch(trained.adapter)
    logger.info("adapter of run %s from flow run %s is in %s", run_id, child.name, adapter_dir)
    return trained
