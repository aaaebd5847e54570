"""Each finished stage's record, kept in the pipeline's MLflow run, so a resumed run goes on
from the first stage that did not finish instead of starting over.

A stage's record (tasks/records.py: paths, metric dicts, gates) is logged as
`pipeline/<stage>.json` when the stage returns. A re-run of the same run (same data and config,
see tasks/common/runs.py) reads the records back and skips those stages; folders they name are
fetched from the artifact store if this machine lacks them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TypeVar

from mlflow.exceptions import MlflowException
from pydantic import TypeAdapter

from tasks.common.tracking import TrackedRun

FOLDER = "pipeline"
T = TypeVar("T")


class StageRecords:
    """The records of a run's finished stages."""

    def __init__(self, run: TrackedRun):
        self.run = run
        try:
            listed = run.client.list_artifacts(run.run_id, FOLDER)
        except (MlflowException, OSError):
            listed = []
        self.finished = {Path(item.path).stem for item in listed}

    def load(self, stage: str, record_type: type[T]) -> T | None:
        """The stage's record, or None when the stage never finished in this run."""
        if stage not in self.finished:
            return None
        folder = self.run.client.download_artifacts(self.run.run_id, f"{FOLDER}/{stage}.json")
        return TypeAdapter(record_type).validate_python(json.loads(Path(folder).read_text()))

    def save(self, stage: str, record: Any) -> None:
        self.run.log_json(dataclasses.asdict(record), f"{FOLDER}/{stage}.json")
        self.finished.add(stage)
