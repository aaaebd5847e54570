"""MLflow plumbing: an explicit handle on one tracking store, and the pipeline run's log.

`Tracking.connect(config.tracking)` names the store once; every call then goes through its
client, so nothing depends on a process-wide tracking URI. The few MLflow calls that only
exist in the fluent API (log_model, register_model, load_model) run inside `fluent()`, which
points MLflow at this store for their duration only.
"""

from __future__ import annotations

import getpass
import hashlib
import importlib.metadata
import json
import os
import re
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import mlflow
import pandas as pd
import yaml
from mlflow.entities import Metric, Param, RunTag
from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.tracking._tracking_service import utils as tracking_utils
from mlflow.utils.mlflow_tags import (
    MLFLOW_GIT_COMMIT,
    MLFLOW_RUN_NOTE,
    MLFLOW_SOURCE_NAME,
    MLFLOW_SOURCE_TYPE,
    MLFLOW_USER,
)

from tasks.common.config import PipelineConfig, TrackingConfig
from tasks.common.credentials import redact
from tasks.common.errors import ConfigError, PipelineError
from tasks.common.gates import Gate
from tasks.common.processes import exclusive
from tasks.common.storage import ensure_room

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
_KEY_CHARS = re.compile(r"[^\w./\- ]")  # what MLflow accepts in a metric/param key (":" aside)
_KEY_MAX = 250
LOCAL_UI = "http://127.0.0.1:5000"  # `make ui` / `make up` serve an embedded store here
SOURCE_NAME = "flows/retrain.py (lora-retrain)"
_NOTE_SPLIT = "\n\n---\n\n"  # run description: what runs, then (after register) the outcome


def metric_key(key: str) -> str:
    """`key` as MLflow accepts it: other characters become "_", long keys are cut.

    Labels come from user data ("refund (partial)", 300-character names), so a key built from
    one may break MLflow's rules; a changed key gets a short hash of the original so that two
    labels never share one.
    """
    clean = _KEY_CHARS.sub("_", key)
    if clean == key and len(key) <= _KEY_MAX:
        return key
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    return f"{clean[: _KEY_MAX - 9]}-{digest}"


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


def local_folder(location: str | None) -> Path | None:
    """The folder of a file: artifact location (None for servers and object stores)."""
    if not location:
        return None
    parsed = urlparse(location)
    if parsed.scheme == "file":
        return Path(url2pathname(parsed.path))
    return Path(location) if parsed.scheme == "" else None


def first_use_lock(uri: str):
    """For a SQLite store, a file lock beside it (MLflow creates a new database's tables on
    first use, and two processes doing that at once collide); no lock for servers."""
    if uri.startswith("sqlite:///"):
        return exclusive(Path(uri.removeprefix("sqlite:///") + ".lock"))
    return nullcontext()


def _create_experiment(client: MlflowClient, tracking: TrackingConfig, uri: str):
    """Create the experiment; one created a moment ago by another process is fine too."""
    location = _artifact_location(tracking, uri)
    root = local_folder(location)
    if root is not None:
        ensure_room(root, 10, "tracking", setting="tracking.artifact_location")
    try:
        client.create_experiment(tracking.experiment, artifact_location=location)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    return client.get_experiment_by_name(tracking.experiment)


DEFAULT_PORTS = {"http": 80, "https": 443, "postgresql": 5432, "mysql": 3306, "mssql": 1433}
SUPPORTED_STORES = "sqlite:///path.db, postgresql://..., mysql://..., http(s)://host:port"
_REACHED: set[str] = set()  # servers this process has reached: later outages get the retries


def probe_server(uri: str) -> None:
    """Fail fast on an HTTP tracking server that was never up, instead of MLflow's minutes of
    retries. Once a server answered in this process, an outage is left to those retries."""
    parts = urlparse(uri)
    scheme = parts.scheme.split("+")[0]  # postgresql+psycopg2 -> postgresql
    if scheme not in DEFAULT_PORTS or not parts.hostname or uri in _REACHED:
        return
    port = parts.port or DEFAULT_PORTS[scheme]
    attempts = max(1, MLFLOW_HTTP_REQUEST_MAX_RETRIES.get())
    for attempt in range(attempts):
        try:
            socket.create_connection((parts.hostname, port), timeout=3).close()
        except socket.gaierror:
            attempts = attempt + 1
            break  # an unknown host does not come back by retrying
        except OSError:
            time.sleep(min(2.0, 0.25 * 2**attempt))
            continue
        _REACHED.add(uri)
        return
    raise PipelineError(
        f"MLflow tracking server {redact(uri)} cannot be reached (after {attempts} retries): "
        f"start it, or fix tracking.uri / MLFLOW_TRACKING_URI"
    )


def open_client(uri: str) -> MlflowClient:
    """A client on `uri` (tracking and registry); a URI MLflow cannot use is a ConfigError."""
    try:
        return MlflowClient(tracking_uri=uri, registry_uri=uri)
    except MlflowException as exc:
        raise ConfigError(
            f"tracking.uri {redact(uri)!r}: MLflow cannot keep runs and a model registry there "
            f"({str(exc).strip().split(';')[0]}); use {SUPPORTED_STORES}"
        ) from None


def store_error(setting: str, value: str, exc: Exception) -> ConfigError | None:
    """The user-fixable reason a store cannot be used (a missing driver, bad credentials)."""
    if isinstance(exc, ModuleNotFoundError):
        return ConfigError(
            f"{setting} {redact(value)!r} needs the Python package that provides "
            f"{exc.name!r} (boto3 for s3://, mysqlclient for mysql://): install it, or use "
            f"a store this install has ({SUPPORTED_STORES}; artifacts in a local folder)"
        )
    if isinstance(exc, MlflowException) and "databricks" in str(exc).lower():
        return ConfigError(f"{setting} {redact(value)!r}: {str(exc).strip().splitlines()[0][:300]}")
    return None


def _is_unreachable(exc: MlflowException) -> bool:
    text = str(exc)
    return (
        "Max retries exceeded" in text or "Connection refused" in text or "API request to" in text
    )


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
    artifact_root: Path | None = None  # the experiment's artifact folder, when it is local

    @classmethod
    def connect(cls, tracking: TrackingConfig) -> Tracking:
        """Open the configured store and its experiment (created on first use)."""
        uri = tracking_uri(tracking)
        probe_server(uri)
        client = open_client(uri)
        try:
            with first_use_lock(uri):
                experiment = client.get_experiment_by_name(tracking.experiment)
        except (MlflowException, ModuleNotFoundError) as exc:
            if (error := store_error("tracking.uri", uri, exc)) is not None:
                raise error from None
            if not isinstance(exc, MlflowException) or not _is_unreachable(exc):
                raise
            raise PipelineError(
                f"MLflow tracking server {redact(uri)} cannot be reached (after "
                f"{MLFLOW_HTTP_REQUEST_MAX_RETRIES.get()} retries): start it, or fix "
                f"tracking.uri / MLFLOW_TRACKING_URI"
            ) from None
        if experiment is None:
            experiment = _create_experiment(client, tracking, uri)
        if experiment.lifecycle_stage == "deleted":
            raise PipelineError(
                f"MLflow experiment {tracking.experiment!r} at {redact(uri)} is deleted: restore "
                f"it (mlflow experiments restore --experiment-id {experiment.experiment_id}) or "
                f"set tracking.experiment to another name"
            )
        root = local_folder(experiment.artifact_location)
        if root is not None:  # checked before anything is logged there
            ensure_room(root, 10, "tracking", setting="tracking.artifact_location")
        return cls(uri, experiment.experiment_id, client, root)

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
        entries = [Metric(metric_key(k), float(v), now, step) for k, v in metrics.items()]
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

    def log_figures(self, figures: Mapping[str, float], artifact_file: str) -> None:
        """Single numbers (rows, drops per reason) as a figure/value table: the chart view is
        kept for curves and scores."""
        frame = pd.DataFrame(
            {"figure": list(figures), "value": [float(v) for v in figures.values()]}
        )
        self.log_table(frame, artifact_file)

    def log_table(self, frame, artifact_file: str) -> None:
        """A table (a pandas DataFrame) the MLflow UI shows as one: counts, not charts."""
        self.client.log_table(self.run_id, frame, artifact_file)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_gate(self, gate: Gate) -> Gate:
        """Record a gate as metrics (value, passed) and a JSON artifact; return it unchanged."""
        self.log_metrics(
            {
                f"gate/{gate.name}.value": gate.value,
                f"gate/{gate.name}.passed": float(gate.passed),
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
        """Log the wall time of a stage's work as metric time/<stage>."""
        start = time.perf_counter()
        yield
        self.log_metrics({f"time/{stage}": time.perf_counter() - start})


# ---- the pipeline run's life: start, continue, end --------------------------------------


def run_name(config: PipelineConfig, key: str) -> str:
    """`<registered model>-<UTC date>-<short pipeline key>`, for the MLflow run and the
    Prefect flow run alike."""
    return f"{config.registry.model_name}-{datetime.now(UTC):%Y%m%d}-{key[:8]}"


def run_url(tracking: Tracking, run_id: str) -> str:
    """The run's page in the MLflow UI: on the tracking server, or `make ui`'s address for an
    embedded store."""
    base = tracking.uri if tracking.uri.startswith(("http://", "https://")) else LOCAL_UI
    page = f"/#/experiments/{tracking.experiment_id}/runs/{run_id}"
    return f"{base.rstrip('/')}{page}?workflowType=machine_learning"  # not the GenAI view


def start_note(config: PipelineConfig) -> str:
    return (
        f"LoRA retrain of `{redact(config.model.name_or_path)}` into registered model "
        f"`{config.registry.model_name}` ({config.task}) on `{redact(config.data.path)}`; "
        f"the decision about production is added here when the run registers its version."
    )


def describe_run(run: TrackedRun, outcome: str) -> None:
    """The run's description (the MLflow UI's Description): its start note, then `outcome`."""
    note = run.client.get_run(run.run_id).data.tags.get(MLFLOW_RUN_NOTE, "")
    run.set_tags({MLFLOW_RUN_NOTE: note.split(_NOTE_SPLIT)[0] + _NOTE_SPLIT + outcome})


def source_tags(config: PipelineConfig) -> dict[str, str]:
    """Who started the run and from what code: the UI's Source and User columns."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        user = "unknown"
    return {
        MLFLOW_USER: user,
        MLFLOW_SOURCE_NAME: SOURCE_NAME,
        MLFLOW_SOURCE_TYPE: "JOB",
        MLFLOW_GIT_COMMIT: _git_commit(),
        MLFLOW_RUN_NOTE: start_note(config),
    }


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
        **source_tags(config),
        **(extra_tags or {}),
        "prefect.flow_run_id": prefect_flow_run_id(),
        "pipeline.base_model": redact(config.model.name_or_path),
        "model.trust_remote_code": str(config.model.trust_remote_code),
        **{f"version.{k}": v for k, v in package_versions().items()},
    }
    created = tracking.client.create_run(tracking.experiment_id, run_name=run_name, tags=tags)
    run = tracking.run(created.info.run_id)
    try:
        run.log_params(config.flat())
        run.log_text(
            redact(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)),
            "config/resolved.yaml",
        )
    except Exception as exc:  # the run must not stay RUNNING with nothing running it
        tracking.client.set_terminated(run.run_id, status="FAILED")
        location = config.tracking.artifact_location or created.info.artifact_uri
        if (error := store_error("tracking.artifact_location", location, exc)) is not None:
            raise error from None
        raise
    return run.run_id


def reopen_pipeline_run(run_id: str, config: PipelineConfig) -> str:
    """Continue an unfinished pipeline run (same params, metrics and artifacts)."""
    client = Tracking.connect(config.tracking).client
    client.update_run(run_id, status="RUNNING")
    client.set_tag(run_id, "prefect.flow_run_id", prefect_flow_run_id())
    return run_id


def end_pipeline_run(run_id: str, config: PipelineConfig, status: str) -> None:
    Tracking.connect(config.tracking).client.set_terminated(run_id, status=status)
