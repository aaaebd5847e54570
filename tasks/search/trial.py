"""One trial: ask the study, train the trial's config as a nested MLflow run, tell the result.

The same function runs a trial in the pipeline's process and in a `lora-train` flow run on
the gpu pool (flows/train.py): only the config, the data record and the run ids travel. The
pruner hears the validation score search.reports_per_epoch times an epoch and can stop
the trial at any of them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import optuna
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from optuna.trial import TrialState
from transformers import TrainerCallback

from tasks.common.config import PipelineConfig
from tasks.common.distributed import is_distributed
from tasks.common.errors import TrainingError
from tasks.common.faults import kill_point
from tasks.common.stage import open_stage
from tasks.common.storage import run_folder, tidy
from tasks.common.tracking import TrackedRun, Tracking, prefect_flow_run_id
from tasks.common.training import checkpoint_dir
from tasks.kinds import kind_of
from tasks.records import PreparedData
from tasks.search import study as studies
from tasks.search.space import label, suggest, with_values
from tasks.train_adapter import train_adapter

TRAINED_RECORD = "trial/trained.json"  # the trial's TrainedAdapter, read when it wins


@dataclass(frozen=True)
class TrialOutcome:
    """How one trial ended: complete (with its score), pruned, or failed (with the reason)."""

    number: int
    state: str
    run_id: str
    values: dict[str, Any] = field(default_factory=dict)
    value: float | None = None
    reason: str = ""


class PruningReporter(TrainerCallback):
    """Reports the validation score of `metric` to the trial `per_epoch` times an epoch (the
    Trainer scores epoch ends; this asks for the scores in between) and stops training when
    the pruner says so. The last score is never pruned: the training it would save is done."""

    def __init__(self, trial: optuna.Trial, metric: str, per_epoch: int = 1):
        self.trial, self.key, self.per_epoch = trial, f"eval_{metric}", per_epoch
        self.scores: list[float] = []
        self.pruned = False
        self.epoch_steps = self.epoch_start = 0

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        if train_dataloader is not None:
            self.epoch_steps = max(len(train_dataloader) // args.gradient_accumulation_steps, 1)

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.epoch_start = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        every = math.ceil(self.epoch_steps / self.per_epoch)
        into = state.global_step - self.epoch_start
        if self.per_epoch > 1 and every and into % every == 0 and into < self.epoch_steps:
            control.should_evaluate = True  # the epoch end's is the Trainer's own

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.pruned:  # stopped within the epoch: not the epoch end's evaluation too
            control.should_evaluate = False

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.pruned:
            return
        value = float((metrics or {}).get(self.key, math.nan))
        self.scores.append(value)
        if not math.isfinite(value):
            raise TrainingError(
                f"validation {self.key.removeprefix('eval_')} is {value} after epoch "
                f"{getattr(state, 'epoch', None) or len(self.scores)}: the trial diverged "
                f"(its learning rate is too high?)"
            )
        self.trial.report(value, step=len(self.scores))
        last = state is not None and state.global_step >= state.max_steps
        if not last and self.trial.should_prune():
            self.pruned = control.should_training_stop = True
            self.trial.set_user_attr(studies.EPOCHS_ATTR, float(state.epoch or 0))


def start_trial_run(tracking: Tracking, parent_run_id: str, number: int, values: dict) -> str:
    """The trial's nested MLflow run under the pipeline's run, with its values as params."""
    parent = tracking.client.get_run(parent_run_id)
    run = tracking.client.create_run(
        parent.info.experiment_id,
        run_name=f"{parent.info.run_name}-trial-{number:03d}",
        tags={
            MLFLOW_PARENT_RUN_ID: parent_run_id,
            "search.trial": str(number),
            "search.study": studies.study_name(parent_run_id),
            "prefect.flow_run_id": prefect_flow_run_id(),
        },
    )
    tracked = tracking.run(run.info.run_id)
    tracked.log_params({key: label(value)[:6000] for key, value in values.items()})
    return run.info.run_id


def end_trial_run(tracking: Tracking, outcome: TrialOutcome) -> None:
    """The trial run's state, value and (failed) reason."""
    run = tracking.run(outcome.run_id)
    tags = {"search.state": outcome.state}
    if outcome.reason:
        tags["search.fail_reason"] = outcome.reason[:5000]
    run.set_tags(tags)
    if outcome.value is not None:
        run.log_metrics({"search/value": outcome.value})
    status = "FAILED" if outcome.state == "failed" else "FINISHED"
    tracking.client.set_terminated(outcome.run_id, status=status)


def run_trial(config: PipelineConfig, data: PreparedData, parent_run_id: str) -> TrialOutcome:
    """Ask the run's study for a trial, train it, tell the study how it ended."""
    metric, direction = kind_of(config).search_objective(config)
    study = studies.open_study(config, parent_run_id, direction)
    trial = study.ask()
    study.sampler = studies.sampler(config.search, trial.number)  # before the first suggest
    values = suggest(trial, config.search.space)
    tracking = Tracking.connect(config.tracking)
    child = start_trial_run(tracking, parent_run_id, trial.number, values)
    trial.set_user_attr(studies.RUN_ATTR, child)
    trial.set_user_attr(studies.FLOW_RUN_ATTR, prefect_flow_run_id())
    kill_point(f"search:trial{trial.number}")  # the tests' SIGKILL of a running trial
    outcome = train_trial(with_values(config, values), data, trial, metric, child)
    outcome = replace(outcome, values=values)
    if outcome.state == "failed":
        trial.set_user_attr(studies.FAIL_REASON, outcome.reason[:2000])
    state = {"complete": TrialState.COMPLETE, "pruned": TrialState.PRUNED}
    study.tell(trial, outcome.value, state=state.get(outcome.state, TrialState.FAIL))
    end_trial_run(tracking, outcome)
    kill_point(f"search:after-trial{trial.number}")
    return outcome


def train_trial(
    config: PipelineConfig, data: PreparedData, trial: optuna.Trial, metric: str, run_id: str
) -> TrialOutcome:
    """Train one trial's config into its run; a failure (NaN loss, out of memory) is the
    trial's outcome, not the search's."""
    reporter = PruningReporter(trial, metric, config.search.reports_per_epoch)
    distributed = is_distributed(config)  # ranks in other processes: scores from MLflow
    try:
        with open_stage(config, run_id, "train_lora") as stage:
            trained = train_adapter(stage, data, callbacks=[] if distributed else [reporter])
    except Exception as exc:  # noqa: BLE001 - any failure of a trial is recorded, the search goes on
        return TrialOutcome(trial.number, "failed", run_id, reason=f"{type(exc).__name__}: {exc}")
    finally:
        tidy(config, checkpoint_dir(config, run_id))
        tidy(config, run_folder(config, run_id))  # the adapter is in the trial's run
    trial.set_user_attr(studies.PARAMS_ATTR, trained.trainable_params)
    stage.run.log_json(asdict(trained), TRAINED_RECORD)
    if reporter.pruned:
        return TrialOutcome(trial.number, "pruned", run_id, value=None)
    scores = logged_scores(stage.run, metric) if distributed else reporter.scores
    if not scores:
        return TrialOutcome(trial.number, "failed", run_id, reason="no validation score")
    return TrialOutcome(trial.number, "complete", run_id, value=scores[-1])


def logged_scores(run: TrackedRun, metric: str) -> list[float]:
    """The per-epoch validation scores rank 0 logged to the trial's run."""
    history = run.client.get_metric_history(run.run_id, f"eval/{metric}")
    return [m.value for m in sorted(history, key=lambda m: (m.step, m.timestamp))]
