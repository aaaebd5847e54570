"""The Optuna study of one pipeline run: where it is stored, its budget, and its winner.

Every process that runs trials (this one, or the `lora-train` flow runs on the gpu pool) opens
the same study by name in the same RDB storage: a SQLite file beside an embedded MLflow
database, PostgreSQL in production. The study is named after the pipeline's MLflow run, so a
re-run of that run (after a kill) continues it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from tasks.common.config import PipelineConfig, SearchConfig
from tasks.common.credentials import redact, without_credentials
from tasks.common.errors import ConfigError
from tasks.common.tracking import tracking_uri

STUDY_FILE = "optuna.db"
STORAGE_ENV = "LORA_SEARCH_STORAGE"  # the study database where search.storage is not set
INTERRUPTED = "interrupted"  # user attr of a trial that was running when its search was killed
FAIL_REASON = "fail_reason"
RUN_ATTR = "mlflow_run_id"
FLOW_RUN_ATTR = "prefect_flow_run_id"  # the flow run that ran the trial ("none": in process)
PARAMS_ATTR = "trainable_params"
EPOCHS_ATTR = "epochs_trained"  # where a pruned trial was stopped
optuna.logging.set_verbosity(logging.WARNING)  # its per-trial INFO lines: ours say more


def storage_url(config: PipelineConfig) -> str:
    """search.storage, else $LORA_SEARCH_STORAGE, else a SQLite file beside the embedded MLflow
    database. The environment's URL may carry the password; when search.storage names the same
    database without one (as trial flow runs receive it), the environment's is used."""
    env = os.environ.get(STORAGE_ENV, "")
    given = config.search.storage
    if given:
        return env if env and without_credentials(env) == without_credentials(given) else given
    if env:
        return env
    uri = tracking_uri(config.tracking)
    if not uri.startswith("sqlite:///"):
        raise ConfigError(
            f"search.storage (or ${STORAGE_ENV}) is not set and the MLflow store "
            f"{redact(uri)} is not a local SQLite file to put the study beside: set "
            f"{STORAGE_ENV} on every worker to a database they all reach, e.g. "
            f"postgresql://lora:PASSWORD@postgres:5432/optuna"
        )
    return f"sqlite:///{Path(uri.removeprefix('sqlite:///')).parent / STUDY_FILE}"


def study_name(run_id: str) -> str:
    return f"lora-search-{run_id}"


def storage(url: str) -> optuna.storages.RDBStorage:
    """The RDB storage; SQLite waits for a writer instead of failing at once (trials in
    several processes write to one file)."""
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine)
    except Exception as exc:  # noqa: BLE001 - sqlalchemy's errors name the cause
        raise ConfigError(
            f"search.storage {redact(url)} cannot be opened ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0]}): check the URL, that the database exists and that "
            f"this host reaches it"
        ) from None


def pruner(search: SearchConfig) -> optuna.pruners.BasePruner:
    if search.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=search.pruner_startup_trials)
    if search.pruner == "successive_halving":  # rungs at epochs 1, 3, 9...: a third goes on
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    return optuna.pruners.NopPruner()


def sampler(search: SearchConfig, number: int) -> optuna.samplers.BaseSampler:
    """Trial `number`'s sampler, seeded with seed + number: a search is reproducible, and a
    resumed one (or a second worker) does not draw the trials it already has again."""
    seed = (search.seed + number) % 2**32
    if search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=search.startup_trials)


def open_study(config: PipelineConfig, run_id: str, direction: str) -> optuna.Study:
    """The run's study, created on first use."""
    return optuna.create_study(
        storage=storage(storage_url(config)),
        study_name=study_name(run_id),
        direction=direction,
        load_if_exists=True,
        sampler=sampler(config.search, 0),
        pruner=pruner(config.search),
    )


@dataclass(frozen=True)
class Counts:
    """The study's trials by outcome; interrupted ones (killed with their search) are failed
    in Optuna but give their budget back."""

    complete: int
    pruned: int
    failed: int
    interrupted: int
    running: int

    @property
    def spent(self) -> int:
        """Trials that used the budget: finished ones, and the ones running now."""
        return self.complete + self.pruned + self.failed + self.running


def counts(study: optuna.Study) -> Counts:
    trials = study.get_trials(deepcopy=False)
    interrupted = sum(t.user_attrs.get(INTERRUPTED, False) for t in trials)
    by_state = {state: sum(t.state == state for t in trials) for state in TrialState}
    return Counts(
        complete=by_state[TrialState.COMPLETE],
        pruned=by_state[TrialState.PRUNED],
        failed=by_state[TrialState.FAIL] - interrupted,
        interrupted=interrupted,
        running=by_state[TrialState.RUNNING] + by_state[TrialState.WAITING],
    )


def fail_interrupted(study: optuna.Study) -> list[FrozenTrial]:
    """Mark the trials that were running when the search died as failed and interrupted
    (call it only where nothing else runs this study's trials); returns them."""
    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))
    for trial in stale:
        fail_trial(study, trial, INTERRUPTED, True)
    return stale


def fail_trial(study: optuna.Study, trial: FrozenTrial, attr: str, value) -> None:
    """Fail a trial that another process was running (Optuna's tell works only on trials
    this process may finish), marking why in its user attribute `attr`."""
    study._storage.set_trial_user_attr(trial._trial_id, attr, value)
    study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """The best complete trial; between equal scores, the one with fewer trainable weights."""
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        return None
    sign = -1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1.0
    return min(done, key=lambda t: (sign * t.value, t.user_attrs.get(PARAMS_ATTR, 0), t.number))
