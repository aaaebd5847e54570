"""Search trials on the gpu pool: `lora-train` flow runs in trial mode, several at once.

Each flow run asks the run's study for one trial (tasks/search/trial.py), trains it where the
pool's worker runs, and tells the study; this side keeps up to search.parallel of them in
flight until the budget is spent. The pool's concurrency limit decides how many really run at
once. A flow run that ends without telling (crashed, cancelled) fails its trial here.
"""

from __future__ import annotations

import time

import optuna
from optuna.trial import TrialState
from prefect import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.states import Cancelling

from flows.flow_run import FINAL
from flows.train import data_parameters
from tasks.common.config import PipelineConfig
from tasks.common.console import run_logger
from tasks.common.credentials import scrubbed
from tasks.common.errors import ConfigError
from tasks.common.tracking import Tracking
from tasks.records import PreparedData
from tasks.search import study as studies

POLL_S = 2.0


def resolved_storage(config: PipelineConfig) -> PipelineConfig:
    """The config with search.storage set to the study database this process uses (without a
    password: scrubbed; each worker takes it from its own $LORA_SEARCH_STORAGE)."""
    search = config.search.model_copy(update={"storage": studies.storage_url(config)})
    return config.model_copy(update={"search": search})


def start_trial_run(config: PipelineConfig, data: PreparedData, run_id: str, name: str):
    """One `lora-train` flow run (named `name`) that runs one trial of the run's study."""
    try:
        return run_deployment(
            name=config.train.deployment,
            flow_run_name=name,
            parameters={
                "run_id": run_id,
                "config": scrubbed(resolved_storage(config).model_dump(mode="json")),
                "data": data_parameters(data),
                "trial": True,
            },
            timeout=0,  # do not wait: several trials run at once
            tags=["lora-retrain", f"mlflow-run:{run_id}", f"search:{run_id}"],
        )
    except ObjectNotFound as exc:
        raise ConfigError(
            f"train.deployment {config.train.deployment!r} not found on the Prefect server: "
            f"create it with `prefect deploy --all`, or unset train.deployment to search "
            f"in-process"
        ) from exc


def fail_untold(study: optuna.Study, flow_run) -> None:
    """A flow run that ended without telling the study: its trial failed, with its state."""
    state = flow_run.state
    reason = f"flow run {flow_run.name} ended {state.name}: {(state.message or '').strip()}"
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if trial.user_attrs.get(studies.FLOW_RUN_ATTR) == str(flow_run.id):
            studies.fail_trial(study, trial, studies.FAIL_REASON, reason)


def cancel_leftovers(client, run_id: str) -> None:
    """Cancel this run's trial flow runs that an earlier, killed attempt left going (their
    trials were marked interrupted)."""
    leftovers = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            tags=FlowRunFilterTags(all_=[f"search:{run_id}"]),
            state=FlowRunFilterState(type=FlowRunFilterStateType(not_any_=FINAL)),
        )
    )
    for run in leftovers:
        restarted = Cancelling(message="its search was restarted")
        client.set_flow_run_state(run.id, restarted, force=True)


def trials_on_deployment(
    config: PipelineConfig,
    data: PreparedData,
    run_id: str,
    study: optuna.Study,
    deadline: float | None,
) -> None:
    """Keep up to search.parallel trial flow runs going until the budget is spent; leaving
    in any other way (the retrain run is cancelled) cancels the ones still going."""
    logger = run_logger()
    in_flight: list = []
    started = len(study.get_trials(deepcopy=False))  # flow runs are named on from there
    run_name = Tracking.connect(config.tracking).client.get_run(run_id).info.run_name
    with get_client(sync_client=True) as client:
        cancel_leftovers(client, run_id)  # an earlier attempt's, killed with it
        try:
            while True:
                running = [client.read_flow_run(r.id) for r in in_flight]
                for ended in (r for r in running if r.state.is_final()):
                    if not ended.state.is_completed():
                        fail_untold(study, ended)
                in_flight = [r for r in running if not r.state.is_final()]
                counts = studies.counts(study)
                told = counts.complete + counts.pruned + counts.failed
                room = config.search.parallel - len(in_flight)
                wanted = config.search.n_trials - told - len(in_flight)
                open_ = deadline is None or time.monotonic() < deadline
                for _ in range(max(0, min(room, wanted)) if open_ else 0):
                    started += 1
                    name = f"{run_name}-search-{started:03d}"
                    in_flight.append(start_trial_run(config, data, run_id, name))
                    logger.info("search: trial flow run %s started", in_flight[-1].name)
                if not in_flight:
                    return
                time.sleep(POLL_S)
        finally:
            for run in in_flight:
                if not client.read_flow_run(run.id).state.is_final():
                    client.set_flow_run_state(
                        run.id, Cancelling(message="search ended"), force=True
                    )
