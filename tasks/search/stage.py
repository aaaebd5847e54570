"""The search stage: spend the study's budget on trials, report, hand the winner's adapter on.

Trials run one after another in this process, or through `run_trials` (flows/search.py: as
`lora-train` flow runs on the gpu pool, several at once). Either way each trial asks and tells
the run's study, so a re-run after a kill continues it: completed trials stay, the trials that
were running are marked failed (interrupted) and their budget is given back.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import mlflow
import optuna

from tasks.common.config import PipelineConfig
from tasks.common.console import run_logger
from tasks.common.errors import ConfigError, TrainingError
from tasks.common.stage import StageContext
from tasks.common.tracking import Tracking
from tasks.kinds import kind_of
from tasks.records import PreparedData, TrainedAdapter
from tasks.search import study as studies
from tasks.search.report import log_report
from tasks.search.space import label
from tasks.search.trial import TRAINED_RECORD, TrialOutcome, run_trial

# run_trials(config, data, run_id, study, deadline): run trials until the budget is spent or
# time.monotonic() passes deadline (None: no time limit)
TrialRunner = Callable[[PipelineConfig, PreparedData, str, optuna.Study, float | None], None]


def trials_here(
    config: PipelineConfig, data: PreparedData, run_id: str, study: optuna.Study, deadline
) -> None:
    """Trials one after another in this process."""
    while studies.counts(study).spent < config.search.n_trials and not past(deadline):
        announce(run_trial(config, data, run_id), config)


def past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def announce(outcome: TrialOutcome, config: PipelineConfig) -> None:
    """One line per finished trial: its values and how it ended."""
    values = ", ".join(f"{k} {label(v)}" for k, v in outcome.values.items())
    score = f"{outcome.value:.4f}" if outcome.value is not None else outcome.reason or "-"
    run_logger().info(
        "search trial %d/%d %s (%s): %s",
        outcome.number + 1,
        config.search.n_trials,
        outcome.state,
        score,
        values,
    )


def close_interrupted(study: optuna.Study, tracking: Tracking) -> None:
    """Trials that were running when the search was killed: failed, budget given back, and
    their MLflow runs ended."""
    for trial in studies.fail_interrupted(study):
        run_id = trial.user_attrs.get(studies.RUN_ATTR)
        if run_id:
            tracking.run(run_id).set_tags({"search.state": "interrupted"})
            tracking.client.set_terminated(run_id, status="KILLED")


def search(
    stage: StageContext, data: PreparedData, run_trials: TrialRunner | None = None
) -> TrainedAdapter:
    """Run the search's remaining budget, log its report and adopt the best trial's adapter."""
    config = stage.config
    if not data.rows.get("validation"):
        raise ConfigError(
            f"search.enabled needs a validation split, and {config.data.path} gave none: add "
            f"a validation file to the data folder, or set data.split.validation above 0"
        )
    metric, direction = kind_of(config).search_objective(config)
    study = studies.open_study(config, stage.run_id, direction)
    close_interrupted(study, stage.run.tracking)
    timeout = config.search.timeout_s
    deadline = time.monotonic() + timeout if timeout else None
    (run_trials or trials_here)(config, data, stage.run_id, study, deadline)
    record = log_report(stage.run, study, config, metric)
    best = studies.best_trial(study)
    if best is None:
        raise TrainingError(every_trial_failed(study))
    return adopt(stage, best.user_attrs[studies.RUN_ATTR], record["chosen"])


def every_trial_failed(study: optuna.Study) -> str:
    trials = study.get_trials(deepcopy=False)
    reasons = [t.user_attrs.get(studies.FAIL_REASON) for t in trials]
    first = next((r for r in reasons if r), "no trial finished (all pruned or interrupted)")
    return f"search: none of the {len(trials)} trials completed; the first failure: {first}"


def adopt(stage: StageContext, trial_run_id: str, chosen: dict) -> TrainedAdapter:
    """The winning trial's adapter as this run's `adapter` (not retrained: its own weights)."""
    folder = stage.stage_dir("search") / trial_run_id
    uri = stage.run.tracking.uri
    local = mlflow.artifacts.download_artifacts(
        run_id=trial_run_id, artifact_path="adapter", dst_path=str(folder), tracking_uri=uri
    )
    record = mlflow.artifacts.download_artifacts(
        run_id=trial_run_id, artifact_path=TRAINED_RECORD, dst_path=str(folder), tracking_uri=uri
    )
    trained = json.loads(Path(record).read_text())
    ref = stage.run.log_folder(Path(local), "adapter")
    fields = {k: v for k, v in trained.items() if k not in ("adapter", "chosen")}
    adopted = TrainedAdapter(adapter=ref, chosen=chosen, **fields)
    stage.run.set_tags({"search.adopted_from_run": trial_run_id})
    return adopted
