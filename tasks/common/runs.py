"""Which MLflow run a pipeline invocation works in: none, a new one, or an unfinished one.

Runs are keyed by the pipeline key (tasks/common/fingerprint.py). Same key as a finished run
that registered a version: nothing new to train (unless forced). Same key as an unfinished run
(killed, failed) whose lease is dead: continue it. Same key as a run whose lease is alive: it is
in progress; say so (exit 2), or wait for it when asked to. Exactly one process wins a race:
leases are atomic claims (tasks/common/lease.py), and of two new runs started together the
older one (start time, then run id) goes on while the other deletes its own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from mlflow.entities import Run

from tasks.common.config import PipelineConfig
from tasks.common.lease import Lease, RunInProgress, claims, describe, lease_alive
from tasks.common.tracking import Tracking, reopen_pipeline_run, run_name, start_pipeline_run

KEY_TAG = "pipeline.key"
VERSION_TAG = "registry.version"
UNFINISHED = ("RUNNING", "FAILED", "KILLED")


@dataclass(frozen=True)
class Claim:
    """The run this invocation works in, and its lease; or why there is nothing to do."""

    run_id: str
    lease: Lease | None
    resumed: bool = False
    skipped_version: str | None = None  # set: a finished run already registered this version

    @property
    def skipped(self) -> bool:
        return self.skipped_version is not None


def keyed_runs(tracking: Tracking, key: str) -> list[Run]:
    """The experiment's runs with this pipeline key, newest first."""
    return tracking.client.search_runs(
        [tracking.experiment_id],
        filter_string=f"tags.`{KEY_TAG}` = '{key}'",
        order_by=["attributes.start_time DESC"],
        max_results=50,
    )


def latest(runs: list[Run]) -> Run | None:
    """The newest run that finished with a version, or that did not finish."""
    for run in runs:
        if run.info.status == "FINISHED" and run.data.tags.get(VERSION_TAG):
            return run
        if run.info.status in UNFINISHED:
            return run
    return None


def in_progress(run: Run) -> RunInProgress:
    return RunInProgress(
        f"a pipeline run with the same data and config is in progress: {describe(run)}; "
        f"wait for it to finish (or pass --wait to wait here), or change the data or config"
    )


def _resume(tracking: Tracking, config: PipelineConfig, run: Run) -> Claim | None:
    lease = Lease(tracking.client, run.info.run_id, config.tracking.lease_ttl_s)
    if not lease.claim(max(claims(run), default=-1) + 1):
        return None  # another process claimed it a moment ago
    reopen_pipeline_run(run.info.run_id, config)
    return Claim(run.info.run_id, lease, resumed=True)


def _start(tracking: Tracking, config: PipelineConfig, key: str) -> Claim | None:
    run_id = start_pipeline_run(config, run_name(config, key), extra_tags={KEY_TAG: key})
    lease = Lease(tracking.client, run_id, config.tracking.lease_ttl_s)
    if lease.claim(0):
        ttl = config.tracking.lease_ttl_s
        live = [r for r in keyed_runs(tracking, key) if r.info.status in UNFINISHED]
        live = [r for r in live if r.info.run_id == run_id or lease_alive(r, ttl)]
        first = min(live, key=lambda r: (r.info.start_time, r.info.run_id))
        if first.info.run_id == run_id:
            return Claim(run_id, lease)
        lease.release()
    tracking.client.delete_run(run_id)  # we lost the race: leave only the winner's run
    return None


def claim_run(
    tracking: Tracking, config: PipelineConfig, key: str, force: bool = False, wait: bool = False
) -> Claim:
    """Skip, continue or start the run for `key` (see the module doc)."""
    ttl = config.tracking.lease_ttl_s
    while True:
        runs = keyed_runs(tracking, key)
        busy = next((r for r in runs if lease_alive(r, ttl)), None)
        if busy is None:
            previous = latest(runs)
            if previous is not None and previous.info.status == "FINISHED" and not force:
                version = previous.data.tags[VERSION_TAG]
                return Claim(previous.info.run_id, None, skipped_version=version)
            if previous is not None and previous.info.status in UNFINISHED:
                claim = _resume(tracking, config, previous)
            else:
                claim = _start(tracking, config, key)
            if claim is not None:
                return claim
            busy = next((r for r in keyed_runs(tracking, key) if lease_alive(r, ttl)), None)
        if not wait:
            raise (
                in_progress(busy)
                if busy is not None
                else RunInProgress(
                    "another process claimed the run for this data and config at the same moment; "
                    "try again in a few seconds (or pass --wait)"
                )
            )
        time.sleep(min(ttl / 4, 5.0))
