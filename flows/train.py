"""The training flow alone (`lora-train`), deployable to the `gpu` work pool.

The retrain flow hands training here through `run_deployment` when `train.deployment` is set.
Only ids, URIs and plain values cross over: the tokenized data comes from the pipeline's MLflow
run, and the adapter plus a record of how it was trained (`train/result.json`) go back to it,
so this flow runs on any machine that reaches the tracking server and its artifact store.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mlflow.artifacts import load_dict
from mlflow.exceptions import MlflowException
from prefect import flow, get_run_logger, tags
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound

from tasks.common.config import PipelineConfig, config_from_dict
from tasks.common.credentials import load_credentials, redact, scrubbed
from tasks.common.errors import ConfigError, TrainingError
from tasks.common.storage import run_folder, tidy
from tasks.common.tracking import ArtifactRef, Tracking, prefect_flow_run_id
from tasks.records import PreparedData, TrainedAdapter
from tasks.stages import train_lora_task

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
    run_id: str, config: dict[str, Any], data: dict[str, Any], output_dir: str | None = None
) -> dict[str, Any]:
    """Train a LoRA adapter for the pipeline's MLflow run `run_id`; return the training record.

    `config` is the resolved pipeline config, `data` the plain values of PreparedData.
    `output_dir` (else $LORA_TRAIN_OUTPUT_DIR, else the config's) is this worker's folder.
    """
    pipeline_config = config_from_dict(config, source="lora-train parameter `config`")
    load_credentials(pipeline_config.tracking)
    local_dir = output_dir or os.environ.get(WORKER_OUTPUT_DIR_ENV) or pipeline_config.output_dir
    pipeline_config = pipeline_config.model_copy(update={"output_dir": local_dir})
    tracking = Tracking.connect(pipeline_config.tracking)
    _require_run(tracking, run_id)
    prepared = data_from_parameters(data, run_id, local_dir)
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


def train_on_deployment(config: PipelineConfig, data: PreparedData, run_id: str) -> TrainedAdapter:
    """Run `lora-train` on the deployment `train.deployment`, wait, fetch the adapter."""
    name = config.train.deployment
    logger = get_run_logger()
    logger.info("handing training of run %s to deployment %s", run_id, name)
    try:
        child = run_deployment(
            name=name,
            parameters={
                "run_id": run_id,
                "config": scrubbed(config.model_dump(mode="json")),  # no URL credentials
                "data": data_parameters(data),
            },
            timeout=None,  # wait however long the gpu pool's queue takes
            poll_interval=2,
            idempotency_key=f"lora-train-{run_id}",  # one training run per pipeline run
            tags=["lora-retrain"],
        )
    except ObjectNotFound as exc:
        raise ConfigError(
            f"train.deployment {name!r} not found on the Prefect server: create it with "
            f"`prefect deploy --all`, or unset train.deployment to train in-process"
        ) from exc
    state = child.state
    if state is None or not state.is_completed():
        state_name = state.name if state is not None else "an unknown state"
        message = (state.message or "").strip() if state is not None else ""
        raise TrainingError(
            f"training flow run {child.name!r} ({child.id}) on deployment {name!r} ended in "
            f"{state_name}" + (f": {message}" if message else "") + "; see its logs in the "
            "Prefect UI"
        )
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
