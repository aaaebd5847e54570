"""The data watch flow (`lora-watch`): one check, its drift report, and the events it calls for.

Scheduled every 15 minutes by prefect.yaml; `python -m flows.cli watch` runs one check from the
shell. The events (`lora.data.changed`, `lora.drift.detected`; tasks/watch/check.py) are what
the `lora-retrain/on-data` deployment's trigger and the alert automations listen for; the
resource is the registered model (`lora.model.<name>`), labelled `lora.retrain` true or false.
"""

from __future__ import annotations

import re
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.context import FlowRunContext
from prefect.events import emit_event

from tasks.common.config import PipelineConfig, load_config
from tasks.common.console import run_logger
from tasks.common.credentials import load_credentials, refuse_credentials
from tasks.watch.check import WatchReport, check
from tasks.watch.report import log_report, markdown


def model_resource(config: PipelineConfig, retrain: bool) -> dict[str, str]:
    """The event's resource: the registered model the watch guards."""
    name = config.registry.model_name
    return {
        "prefect.resource.id": f"lora.model.{name}",
        "prefect.resource.name": name,
        "lora.retrain": "true" if retrain else "false",
    }


def payload(report: WatchReport, watch_run_id: str) -> dict:
    """What a retrain (and an alert) needs to know about the check."""
    return {
        "model": report.model,
        "production_version": report.version,
        "new_rows": report.new_rows,
        "rows": report.rows,
        "data_sha256": report.source_sha256,
        "verdict": report.verdict,
        "drifted": [t["name"] for t in report.tests if t["drifted"]],
        "p_values": {t["name"]: t["p_value"] for t in report.tests},
        "watch_run_id": watch_run_id,
    }


def emit(config: PipelineConfig, report: WatchReport, watch_run_id: str) -> list[str]:
    """Emit the report's events; the ids of those the API took."""
    ids = []
    for name in report.events:
        event = emit_event(
            event=name,
            resource=model_resource(config, report.retrain),
            payload=payload(report, watch_run_id),
        )
        if event is not None:
            ids.append(str(event.id))
    return ids


def artifact_key(model: str) -> str:
    """The Prefect artifact key of a model's drift report (lowercase, digits, dashes)."""
    return re.sub(r"[^a-z0-9-]+", "-", f"drift-{model}".lower())[:100]


@flow(name="lora-watch", log_prints=True)
def watch_flow(
    config_path: str = "configs/default.yaml", overrides: list[str] | None = None
) -> dict:
    """Check the watched data (and traffic) against the production model's; report; emit."""
    refuse_credentials(overrides)
    config = load_config(config_path, overrides)
    load_credentials(config.tracking)
    folder = Path(config.output_dir) / "watch"
    report = check(config, folder / "cache")
    run_id = log_report(config, report, folder)
    if FlowRunContext.get() is not None:
        create_markdown_artifact(
            markdown(report), key=artifact_key(config.registry.model_name),
            description=report.verdict[:500],
        )  # fmt: skip
    events = emit(config, report, run_id)
    run_logger().info("watch %s: %s (events: %s)", report.model, report.verdict,
                      ", ".join(report.events) or "none")  # fmt: skip
    return {**report.as_dict(), "watch_run_id": run_id, "event_ids": events}
