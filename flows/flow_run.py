"""The Prefect flow run as users see it: the MLflow run's name, and tags with the outcome."""

from __future__ import annotations

from prefect import get_client
from prefect.runtime import flow_run

from tasks.common.tracking import Tracking


def _current_id():
    return flow_run.id  # None outside a flow run (plain function calls in tests)


def label_flow_run(tracking: Tracking, run_id: str) -> None:
    """Name this flow run as its MLflow run is named and tag it with that run's id, so each UI
    leads to the other."""
    flow_run_id = _current_id()
    if flow_run_id is None:
        return
    name = tracking.client.get_run(run_id).info.run_name
    with get_client(sync_client=True) as client:
        current = client.read_flow_run(flow_run_id)
        tags = sorted({*current.tags, f"mlflow-run:{run_id}"})
        client.update_flow_run(flow_run_id, name=name or current.name, tags=tags)


def tag_flow_run(*tags: str) -> None:
    """Add tags to this flow run (model, version, promoted or kept)."""
    flow_run_id = _current_id()
    if flow_run_id is None:
        return
    with get_client(sync_client=True) as client:
        current = client.read_flow_run(flow_run_id)
        client.update_flow_run(flow_run_id, tags=sorted({*current.tags, *tags}))
