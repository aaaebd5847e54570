"""What every stage starts with: the config, its MLflow run, a timer and checked folders."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tasks.common.config import PipelineConfig
from tasks.common.gates import Comparison, Gate, evaluate_gate
from tasks.common.models import base_model_mb
from tasks.common.storage import ensure_room, need_mb, run_folder
from tasks.common.tracking import ArtifactRef, TrackedRun, Tracking


@dataclass(frozen=True)
class StageContext:
    """One stage of one pipeline run: config, the run to log to, and its working folders."""

    config: PipelineConfig
    run: TrackedRun
    stage: str
    model_mb: float

    @property
    def run_id(self) -> str:
        return self.run.run_id

    def stage_dir(self, name: str) -> Path:
        """output_dir/<run id>/<name>, checked for access and free space before writing; so is
        the artifact store when it is a local folder (the stage's outputs are logged there)."""
        need = need_mb(name, self.model_mb)
        root = self.run.tracking.artifact_root
        if root is not None:
            ensure_room(root, need, name, setting="tracking.artifact_location")
        return ensure_room(run_folder(self.config, self.run_id) / name, need, name)

    def fetch(self, ref: ArtifactRef) -> Path:
        return self.run.fetch(ref)

    def gate(self, name: str, value: float, threshold: float, comparison: Comparison) -> Gate:
        """Evaluate a gate and log it to the run (metrics and gates/<name>.json)."""
        return self.run.log_gate(evaluate_gate(name, value, threshold, comparison))


@contextmanager
def open_stage(config: PipelineConfig, run_id: str, stage: str) -> Iterator[StageContext]:
    """Connect to the run's store and time the stage (metric time/<stage>)."""
    run = Tracking.connect(config.tracking).run(run_id)
    context = StageContext(config, run, stage, base_model_mb(config.model))
    with run.timer(stage):
        yield context
