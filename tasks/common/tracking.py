"""MLflow plumbing: an explicit handle on one tracking store, and the pipeline run's log.

`Tracking.connect(config.tracking)` names the store once; every call then goes through its
client, so nothing depends on a process-wide tracking URI. The few MLflow calls that only
exist in the fluent API (log_model, register_model, load_model) run inside `fluent()`, which
points MLflow at this store for their duration only.
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
from mlflow.tracking._tracking_service import utils as tracking_utils

from tasks.common.config import PipelineConfig, TrackingConfig
from tasks.common.errors import PipelineError
from tasks.common.gates import Gate

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
_PARAM_BATCH = 100  # MLflow accepts at most 100 params / 1000 metrics per log_batch call
_METRIC_BATCH = 1000


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


def _is_unreachable(exc: MlflowException) -> bool:
    text = str(exc)
    return (
        "Max retries exceeded" in text or "Connection refused" in text or "API request to" in text
    )


_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")


def redact(value: object) -> str:
    """Text safe to log: credentials in URLs (scheme://user:password@host) become ***."""
    return _USERINFO.sub(r"\g<scheme>***@", str(value))


@dataclass(frozen=True)
class ArtifactRef:
    """A folder a stage wrote: where it is on this machine and where it lives in the run."""

    run_id: str
    artifact_path: str
    local_path: str


@dataclass(frozen=True)
class Tracking:
    """One MLflow store (tracking and registry) and the pipeline's experiment in it."""

    uri: str
    experiment_id: str
    client: MlflowClient

    @classmethod
    def connect(cls, tracking: TrackingConfig) -> Tracking:
        """Open the configured store and its experiment (created on first use)."""
        uri = tracking_uri(tracking)
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        try:
            experiment = client.get_experiment_by_name(tracking.experiment)
        except MlflowException as exc:
            if not _is_unreachable(exc):
                raise
            raise PipelineError(
                f"MLflow tracking server {redact(uri)} cannot be reached (after "
                f"{MLFLOW_HTTP_REQUEST_MAX_RETRIES.get()} retries): start it, or fix "
                f"tracking.uri / MLFLOW_TRACKING_URI"
            ) from None
        if experiment is None:
            experiment_id = client.create_experiment(
                tracking.experiment, artifact_location=_artifact_location(tracking, uri)
            )
        else:
            experiment_id = experiment.experiment_id
        return cls(uri=uri, experiment_id=experiment_id, client=client)

    @contextmanager
    def fluent(self) -> Iterator[None]:
        """Point MLflow's fluent API (and its registry) at this store, for this block only.

        Afterwards the previous URI is back, including MLFLOW_TRACKING_URI in the environment
        (MLflow's own _use_tracking_uri would unset that variable).
        """
        previous = getattr(tracking_utils, "_tracking_uri", None)
        previous = previous or os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(self.uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(previous)

    def run(self, run_id: str) -> TrackedRun:
        return TrackedRun(self, run_id)


@dataclass(frozen=True)
class TrackedRun:
    """The pipeline's MLflow run: everything a stage logs goes through here."""

    tracking: Tracking
    run_id: str

    @property
    def client(self) -> MlflowClient:
        return self.tracking.client

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        """Log a dict of metrics in as few calls as possible (NaN is logged, never dropped)."""
        now = int(time.time() * 1000)
        entries = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for start in range(0, len(entries), _METRIC_BATCH):
            self.client.log_batch(self.run_id, metrics=entries[start : start + _METRIC_BATCH])

    def set_tags(self, tags: Mapping[str, object]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_params(self, params: Mapping[str, object]) -> None:
        entries = [Param(k, redact(v)[:6000]) for k, v in sorted(params.items())]
        for start in range(0, len(entries), _PARAM_BATCH):
            self.client.log_batch(self.run_id, params=entries[start : start + _PARAM_BATCH])

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_json(self, data: dict, artifact_file: str) -> None:
        self.log_text(json.dumps(data, indent=2, sort_keys=True), artifact_file)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_gate(self, gate: Gate) -> Gate:
        """Record a gate as metrics (value, passed) and a JSON artifact; return it unchanged."""
        self.log_metrics(
            {
                f"gate.{gate.name}.value": gate.value,
                f"gate.{gate.name}.passed": float(gate.passed),
            }
        )
        self.client.log_dict(self.run_id, gate.as_dict(), f"gates/{gate.name}.json")
        return gate

    def log_folder(self, local_dir: Path, artifact_path: str) -> ArtifactRef:
        """Upload a stage's output folder to the run and return a reference to it."""
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)
        return ArtifactRef(
            run_id=self.run_id, artifact_path=artifact_path, local_path=str(local_dir)
        )

    def fetch(self, ref: ArtifactRef) -> Path:
        """The folder on this machine, downloaded from the artifact store when it is missing."""
        local = Path(ref.local_path)
        if local.exists():
            return local
        local.parent.mkdir(parents=True, exist_ok=True)
        downloaded = mlflow.artifacts.download_artifacts(
            run_id=ref.run_id,
            artifact_path=ref.artifact_path,
            dst_path=str(local.parent),
            tracking_uri=self.tracking.uri,
        )
        return Path(downloaded)

    @contextmanager
    def active(self) -> Iterator[mlflow.ActiveRun]:
        """This run as the fluent API's active run (for mlflow.*.log_model), on this store."""
        with self.tracking.fluent():
            current = mlflow.active_run()
            if current is not None and current.info.run_id == self.run_id:
                yield current
                return
            with mlflow.start_run(run_id=self.run_id, nested=current is not None) as run:
                yield run
            self.client.update_run(self.run_id, status="RUNNING")  # the pipeline goes on

    @contextmanager
    def timer(self, stage: str) -> Iterator[None]:
        """Log the wall time of a stage's work as metric stage_seconds.<stage>."""
        start = time.perf_counter()
        yield
        self.log_metrics({f"stage_seconds.{stage}": time.perf_counter() - start})


# ---- the pipeline run's life: start, continue, end --------------------------------------


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


def prefect_flow_run_id() -> str:
    try:
        from prefect.runtime import flow_run

        return str(flow_run.id or "none")
    except Exception:  # noqa: BLE001 - outside Prefect there is no flow run
        return "none"


def start_pipeline_run(
    config: PipelineConfig, run_name: str | None = None, extra_tags: dict[str, str] | None = None
) -> str:
    """Create the pipeline's MLflow run with params, tags and the resolved config."""
    tracking = Tracking.connect(config.tracking)
    tags = {
        **(extra_tags or {}),
        "prefect.flow_run_id": prefect_flow_run_id(),
        "git.commit": _git_commit(),
        "pipeline.base_model": redact(config.model.name_or_path),
        "model.trust_remote_code": str(config.model.trust_remote_code),
        **{f"version.{k}": v for k, v in package_versions().items()},
    }
    created = tracking.client.create_run(tracking.experiment_id, run_name=run_name, tags=tags)
    run = tracking.run(created.info.run_id)
    run.log_params(config.flat())
    run.log_text(
        redact(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)),
        "config/resolved.yaml",
    )
    return run.run_id


def reopen_pipeline_run(run_id: str, config: PipelineConfig) -> str:
    """Continue an unfinished pipeline run (same params, metrics and artifacts)."""
    client = Tracking.connect(config.tracking).client
    client.update_run(run_id, status="RUNNING")
    client.set_tag(run_id, "prefect.flow_run_id", prefect_flow_run_id())
    return run_id


def end_pipeline_run(run_id: str, config: PipelineConfig, status: str) -> None:
    Tracking.connect(config.tracking).client.set_terminated(run_id, status=status)
