"""MLflow plumbing shared by the stages: the pipeline run, metrics, artifacts and gates.

Stages log with an explicit run id through MlflowClient, so they work from any thread,
process or machine that can reach the tracking server.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlflow
import yaml
from mlflow.entities import Metric, Param, RunTag
from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tasks.config import PipelineConfig, TrackingConfig
from tasks.errors import PipelineError
from tasks.gates import Gate

DEFAULT_STORE = Path("mlruns")
TRACKED_PACKAGES = (
    "torch",
    "transformers",
    "datasets",
    "optimum",
    "optimum-onnx",
    "onnxruntime",
    "onnxruntime-gpu",
    "mlflow",
    "prefect",
)
_BATCH = 100  # MLflow accepts at most 100 params / 1000 metrics per log_batch call


def tracking_uri(tracking: TrackingConfig) -> str:
    """Config value, else MLFLOW_TRACKING_URI, else a local SQLite file under mlruns/."""
    if tracking.uri:
        return tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    DEFAULT_STORE.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(DEFAULT_STORE / 'mlflow.db').resolve()}"


def _artifact_location(tracking: TrackingConfig, uri: str) -> str | None:
    if tracking.artifact_location:
        return tracking.artifact_location
    if uri.startswith("sqlite:") or uri.startswith("file:"):
        return (DEFAULT_STORE / "artifacts").resolve().as_uri()
    return None  # a tracking server decides (e.g. proxied S3)


def connect(tracking: TrackingConfig) -> tuple[MlflowClient, str]:
    """Point MLflow at the configured store; return a client and the experiment id."""
    uri = tracking_uri(tracking)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        experiment = client.get_experiment_by_name(tracking.experiment)
    except MlflowException as exc:
        if not _is_unreachable(exc):
            raise
        raise PipelineError(
            f"MLflow tracking server {redact(uri)} cannot be reached (after "
            f"{MLFLOW_HTTP_REQUEST_MAX_RETRIES.get()} retries): start it, or fix tracking.uri / "
            f"MLFLOW_TRACKING_URI"
        ) from None
    if experiment is not None:
        return client, experiment.experiment_id
    return client, client.create_experiment(
        tracking.experiment, artifact_location=_artifact_location(tracking, uri)
    )


def _is_unreachable(exc: MlflowException) -> bool:
    text = str(exc)
    return (
        "Max retries exceeded" in text or "Connection refused" in text or "API request to" in text
    )


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def package_versions() -> dict[str, str]:
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _prefect_flow_run_id() -> str:
    try:
        from prefect.runtime import flow_run

        return str(flow_run.id or "none")
    except Exception:  # noqa: BLE001 - outside Prefect there is no flow run
        return "none"


_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")


def redact(value: object) -> str:
    """Text safe to log: credentials in URLs (scheme://user:password@host) become ***."""
    return _USERINFO.sub(r"\g<scheme>***@", str(value))


def start_pipeline_run(
    config: PipelineConfig, run_name: str | None = None, extra_tags: dict[str, str] | None = None
) -> str:
    """Create the pipeline's MLflow run with params, tags and the resolved config."""
    client, experiment_id = connect(config.tracking)
    tags = {
        **(extra_tags or {}),
        "prefect.flow_run_id": _prefect_flow_run_id(),
        "git.commit": _git_commit(),
        "pipeline.base_model": redact(config.model.name_or_path),
        "model.trust_remote_code": str(config.model.trust_remote_code),
        **{f"version.{k}": v for k, v in package_versions().items()},
    }
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    run_id = run.info.run_id
    params = [Param(k, redact(v)[:6000]) for k, v in sorted(config.flat().items())]
    for start in range(0, len(params), _BATCH):
        client.log_batch(run_id, params=params[start : start + _BATCH])
    client.log_text(
        run_id,
        redact(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)),
        "config/resolved.yaml",
    )
    return run_id


def reopen_pipeline_run(run_id: str, config: PipelineConfig) -> str:
    """Continue an unfinished pipeline run (same params, metrics and artifacts)."""
    client, _ = connect(config.tracking)
    client.update_run(run_id, status="RUNNING")
    client.set_tag(run_id, "prefect.flow_run_id", _prefect_flow_run_id())
    return run_id


def end_pipeline_run(run_id: str, config: PipelineConfig, status: str) -> None:
    client, _ = connect(config.tracking)
    client.set_terminated(run_id, status=status)


def log_metrics(run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
    """Log a dict of metrics in one call (NaN is logged as NaN, never dropped)."""
    now = int(time.time() * 1000)
    entries = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    client = MlflowClient()
    for start in range(0, len(entries), 1000):
        client.log_batch(run_id, metrics=entries[start : start + 1000])


def set_tags(run_id: str, tags: Mapping[str, str]) -> None:
    MlflowClient().log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_gate(run_id: str, gate: Gate) -> Gate:
    """Record a gate as metrics (value, passed) and a JSON artifact; return it unchanged."""
    log_metrics(
        run_id,
        {f"gate.{gate.name}.value": gate.value, f"gate.{gate.name}.passed": float(gate.passed)},
    )
    MlflowClient().log_dict(run_id, gate.as_dict(), f"gates/{gate.name}.json")
    return gate


def log_json(run_id: str, data: dict, artifact_file: str) -> None:
    MlflowClient().log_text(run_id, json.dumps(data, indent=2, sort_keys=True), artifact_file)


@dataclass(frozen=True)
class ArtifactRef:
    """A folder a stage wrote: where it is on this machine and where it lives in the run."""

    run_id: str
    artifact_path: str
    local_path: str

    def fetch(self) -> Path:
        """The local folder, downloaded from the artifact store when this machine lacks it."""
        local = Path(self.local_path)
        if local.exists():
            return local
        local.parent.mkdir(parents=True, exist_ok=True)
        downloaded = mlflow.artifacts.download_artifacts(
            run_id=self.run_id, artifact_path=self.artifact_path, dst_path=str(local.parent)
        )
        return Path(downloaded)


def log_folder(run_id: str, local_dir: Path, artifact_path: str) -> ArtifactRef:
    """Upload a stage's output folder to the run and return a reference to it."""
    MlflowClient().log_artifacts(run_id, str(local_dir), artifact_path)
    return ArtifactRef(run_id=run_id, artifact_path=artifact_path, local_path=str(local_dir))


@contextmanager
def active_run(run_id: str) -> Iterator[mlflow.ActiveRun]:
    """Make run_id the fluent API's active run (for mlflow.*.log_model and log_input)."""
    current = mlflow.active_run()
    if current is not None and current.info.run_id == run_id:
        yield current
        return
    with mlflow.start_run(run_id=run_id, nested=current is not None) as run:
        yield run
    MlflowClient().update_run(run_id, status="RUNNING")  # the pipeline run is still going


@contextmanager
def stage_timer(run_id: str, stage: str) -> Iterator[None]:
    """Log the wall time of a stage's work as metric stage_seconds.<stage>."""
    start = time.perf_counter()
    yield
    log_metrics(run_id, {f"stage_seconds.{stage}": time.perf_counter() - start})
