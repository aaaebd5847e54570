"""What a search leaves in the pipeline's MLflow run: the trials table, the study's plots, a
summary, and `search.*` tags that the register stage copies onto the model version."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import optuna
import optuna.visualization.matplotlib as optuna_plots
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from tasks.common.config import PipelineConfig
from tasks.common.credentials import redact
from tasks.common.plots import plt, save_figure
from tasks.common.tracking import TrackedRun
from tasks.search import study as studies
from tasks.search.space import label, values_of

STATES = {
    TrialState.COMPLETE: "complete",
    TrialState.PRUNED: "pruned",
    TrialState.FAIL: "failed",
    TrialState.RUNNING: "running",
    TrialState.WAITING: "waiting",
}
TAG_PREFIX = "search."


def trial_state(trial: FrozenTrial) -> str:
    if trial.user_attrs.get(studies.INTERRUPTED):
        return "interrupted"
    return STATES[trial.state]


def trial_seconds(trial: FrozenTrial) -> float | None:
    """How long a finished trial ran (None while it runs)."""
    if trial.datetime_complete and trial.datetime_start:
        return (trial.datetime_complete - trial.datetime_start).total_seconds()
    return None


def trials_frame(study: optuna.Study, config: PipelineConfig) -> pd.DataFrame:
    """One row per trial: its number, state, score, validation scores reported (and the
    epoch a pruned one was stopped at), values and MLflow run."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        values = values_of(trial.params, config.search.space) if trial.params else {}
        rows.append(
            {
                "trial": trial.number,
                "state": trial_state(trial),
                "value": trial.value,
                "scores": len(trial.intermediate_values),
                "stopped_at_epoch": trial.user_attrs.get(studies.EPOCHS_ATTR),
                "seconds": trial_seconds(trial),
                **{key: label(value) for key, value in values.items()},
                "trainable_params": trial.user_attrs.get(studies.PARAMS_ATTR),
                "mlflow_run_id": trial.user_attrs.get(studies.RUN_ATTR),
                "reason": trial.user_attrs.get(studies.FAIL_REASON, ""),
            }
        )
    return pd.DataFrame(rows)


def summary(study: optuna.Study, config: PipelineConfig, metric: str) -> dict[str, Any]:
    """The search in one record: objective, budget spent by outcome, the winner and its values."""
    counts = studies.counts(study)
    best = studies.best_trial(study)
    return {
        "study": study.study_name,
        "storage": redact(studies.storage_url(config)),
        "objective": f"validation {metric} ({study.direction.name.lower()})",
        "n_trials": config.search.n_trials,
        "complete": counts.complete,
        "pruned": counts.pruned,
        "failed": counts.failed,
        "interrupted": counts.interrupted,
        "best_trial": best.number if best else None,
        "best_value": best.value if best else None,
        "best_run_id": best.user_attrs.get(studies.RUN_ATTR) if best else None,
        "chosen": values_of(best.params, config.search.space) if best else {},
        "trial_seconds": sum(
            seconds for t in study.get_trials(deepcopy=False) if (seconds := trial_seconds(t))
        ),
    }


def tags(record: dict[str, Any]) -> dict[str, str]:
    """search.* tags: the study, the counts, the winner's score and each chosen value."""
    fixed = ("study", "objective", "complete", "pruned", "failed", "best_trial", "best_value")
    out = {f"{TAG_PREFIX}{key}": str(record[key]) for key in fixed}
    out |= {f"{TAG_PREFIX}best.{k}": label(v)[:5000] for k, v in record["chosen"].items()}
    return out


def log_report(run: TrackedRun, study: optuna.Study, config: PipelineConfig, metric: str) -> dict:
    """Log the table, summary, tags and plots; return the summary."""
    record = summary(study, config, metric)
    run.log_table(trials_frame(study, config), "search/trials.json")
    run.log_json(record, "search/summary.json")
    run.set_tags(tags(record))
    folder = Path(config.output_dir) / run.run_id / "search"
    for path in plots(study, config, folder):
        run.log_artifact(path, "search/plots")
    return record


def plots(study: optuna.Study, config: PipelineConfig, folder: Path) -> list[Path]:
    """The study's plots as PNG files (each needs two complete trials; a plot Optuna cannot
    draw for this study, e.g. importances of a single-valued space, is left out)."""
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(done) < 2:
        return []
    makers = {
        "optimization_history": lambda: optuna_plots.plot_optimization_history(study),
        "param_importances": lambda: optuna_plots.plot_param_importances(study),
        "parallel_coordinate": lambda: optuna_plots.plot_parallel_coordinate(study),
        "rank_vs_learning_rate": lambda: rank_vs_learning_rate(done, config),
    }
    paths = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", UserWarning)  # matplotlib: an axis of one value
        for name, make in makers.items():
            try:
                axes = make()
            except (ValueError, RuntimeError, KeyError):  # not drawable for this study
                plt.close("all")
                continue
            if axes is not None:
                figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
                paths.append(save_figure(figure, folder / f"{name}.png"))
    return paths


def rank_vs_learning_rate(done: list[FrozenTrial], config: PipelineConfig):
    """Each complete trial at (learning rate, r), coloured by its score."""
    space = config.search.space
    if "lora.r" not in space or "train.learning_rate" not in space:
        return None
    values = [values_of(t.params, space) for t in done]
    fig, ax = plt.subplots(figsize=(6, 4))
    points = ax.scatter(
        [v["train.learning_rate"] for v in values],
        [v["lora.r"] for v in values],
        c=[t.value for t in done],
        cmap="viridis",
        s=60,
    )
    ax.set_xscale("log")
    ax.set_xlabel("train.learning_rate")
    ax.set_ylabel("lora.r")
    ax.set_title("Complete trials: rank x learning rate")
    fig.colorbar(points, ax=ax, label="validation score")
    return ax
