"""The Prefect flow run as users see it: the MLflow run's name, and tags with the outcome."""

from __future__ import annotations

from prefect import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import StateType
from prefect.runtime import flow_run
from prefect.states import Cancelling

from tasks.common.tracking import Tracking

FINAL = [StateType.COMPLETED, StateType.FAILED, StateType.CANCELLED, StateType.CRASHED]


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


def cancel_training_runs(flow, cancelled_run, state) -> None:
    """on_cancellation hook of the retrain flow: cancel the `lora-train` flow runs of its
    MLflow run (tagged mlflow-run:<id>) that have not ended, so that their workers stop the
    ranks; Prefect does not cancel flow runs started by run_deployment with their parent."""
    del flow, state
    run_tags = [t for t in cancelled_run.tags if t.startswith("mlflow-run:")]
    if not run_tags:
        return
    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                tags=FlowRunFilterTags(all_=run_tags),
                state=FlowRunFilterState(type=FlowRunFilterStateType(not_any_=FINAL)),
            )
        )
        for child in children:
            if child.id != cancelled_run.id:
                cancel = Cancelling(
                    message=f"its retrain flow run {cancelled_run.name} was cancelled"
                )
                client.set_flow_run_state(child.id, cancel, force=True)
