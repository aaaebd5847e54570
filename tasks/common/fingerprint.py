"""What makes two pipeline runs the same: the data's content and the config that matters.

A re-run with the same key continues an unfinished MLflow run (resuming training from its last
checkpoint), and ends early when a finished run already registered a model for that key.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from tasks.common.config import PipelineConfig
from tasks.common.datasets import content_sha256, find_split_files
from tasks.common.tracking import Tracking

KEY_TAG = "pipeline.key"
VERSION_TAG = "registry.version"
IGNORED = ("tracking", "output_dir")  # where results go does not change what is trained


def pipeline_key(config: PipelineConfig) -> str:
    """sha256 over the data files' bytes and the config (minus where results are written)."""
    settings = config.model_dump(mode="json", exclude=set(IGNORED))
    settings["train"].pop("checkpoint_dir", None)
    digest = hashlib.sha256(content_sha256(list(find_split_files(config.data).values())).encode())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class PreviousRun:
    """The latest MLflow run with the same key: finished (with a version) or not."""

    run_id: str
    finished: bool
    version: str | None


def previous_run(tracking: Tracking, key: str) -> PreviousRun | None:
    """The newest run with this key that finished with a version, or that did not finish."""
    runs = tracking.client.search_runs(
        [tracking.experiment_id],
        filter_string=f"tags.`{KEY_TAG}` = '{key}'",
        order_by=["attributes.start_time DESC"],
        max_results=20,
    )
    for run in runs:
        if run.info.status == "FINISHED" and run.data.tags.get(VERSION_TAG):
            return PreviousRun(run.info.run_id, True, run.data.tags[VERSION_TAG])
        if run.info.status in ("RUNNING", "FAILED", "KILLED"):
            return PreviousRun(run.info.run_id, False, None)
    return None
