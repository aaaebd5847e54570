"""Default config vs the searched winner on the demo data, and what pruning saved.

Both arms run the real pipeline (flows.retrain.run_stages) on the packaged MiniLM and the
demo support tickets, in one process, one after the other, each in its own temporary MLflow
store, through the evaluate stage:
  A. default: configs/default.yaml as it is (one training);
  B. search:  the same config with search.enabled=true and the documented default space
     (--trials, default the config's search.n_trials), trials one after another here.

Printed: each arm's validation score (A: the last epoch's eval/macro_f1; B: the best trial's)
and test macro-F1 / accuracy from the evaluate stage (the test split is read only there), the
winner's values, the trials by outcome, and the cost: the search's wall time against
n_trials x A's training time, and what pruning saved: 1 - (seconds the trials trained) /
(seconds they would have trained unpruned; a pruned trial's time scaled by epochs / the
epoch it was stopped at). Goal: B's test macro-F1 above A's, pruning saving at least 30% of
the trial time.

Run:  .venv/bin/python benchmarks/search.py [--trials 12] [--json out.json] [--set KEY=VALUE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flows.retrain import run_stages  # noqa: E402
from tasks.common.config import load_config  # noqa: E402
from tasks.common.tracking import Tracking, start_pipeline_run  # noqa: E402
from tasks.search import study as studies  # noqa: E402
from tasks.search.report import trials_frame  # noqa: E402


def arm(config_path: Path, store: Path, overrides: list[str]) -> dict:
    """One pipeline run through evaluate; its scores, times and (searched) study."""
    where = [
        f"tracking.uri=sqlite:///{store / 'mlflow.db'}",
        f"tracking.artifact_location={(store / 'artifacts').as_uri()}",
        f"output_dir={store / 'outputs'}",
        "train.checkpoint_steps=0",
    ]
    config = load_config(config_path, where + overrides)
    run_id = start_pipeline_run(config)
    start = time.perf_counter()
    out = run_stages(config, run_id, until="evaluate")
    seconds = time.perf_counter() - start
    run = Tracking.connect(config.tracking).client.get_run(run_id)
    metrics = run.data.metrics
    stage = "time/search" if config.search.enabled else "time/train_lora"
    result = {
        "test_macro_f1": out.evaluation.metrics["macro_f1"],
        "test_accuracy": out.evaluation.metrics["accuracy"],
        "train_seconds": metrics[stage],
        "pipeline_seconds": seconds,
        "chosen": out.trained.chosen,
    }
    if not config.search.enabled:
        result["validation_macro_f1"] = metrics["eval/macro_f1"]
        return result
    direction = "maximize"
    study = studies.open_study(config, run_id, direction)
    frame = trials_frame(study, config)
    result["validation_macro_f1"] = studies.best_trial(study).value
    result["trials"] = frame.drop(columns=["mlflow_run_id", "reason"]).to_dict("records")
    result["states"] = frame["state"].value_counts().to_dict()
    result["n_trials"] = config.search.n_trials
    result["saved_by_pruning"] = pruning_saving(frame, config.train.epochs)
    return result


def pruning_saving(frame, epochs: float) -> float:
    """1 - trained seconds / seconds unpruned (a pruned trial's scaled by epochs / the epoch
    it was stopped at)."""
    done = frame[frame["state"].isin(["complete", "pruned"])]
    spent = float(done["seconds"].sum())
    scale = [
        epochs / row.stopped_at_epoch if row.state == "pruned" else 1.0 for row in done.itertuples()
    ]
    unpruned = float(sum(s * f for s, f in zip(done["seconds"], scale, strict=True)))
    return 1.0 - spent / unpruned if unpruned else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs/default.yaml"))
    parser.add_argument("--trials", type=int, default=None, help="search.n_trials")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-search-") as tmp:
        default = arm(Path(args.config), Path(tmp) / "default", args.overrides)
        trials = [f"search.n_trials={args.trials}"] if args.trials else []
        searched = arm(
            Path(args.config),
            Path(tmp) / "search",
            ["search.enabled=true", *trials, *args.overrides],
        )
    n = searched["n_trials"]
    figures = {
        "default": default,
        "search": searched,
        "test_macro_f1_gain": searched["test_macro_f1"] - default["test_macro_f1"],
        "search_seconds_vs_n_trials_default_trainings": searched["train_seconds"]
        / (n * default["train_seconds"]),
    }
    print(f"{'arm':<8} {'val macro-F1':>12} {'test macro-F1':>13} {'test acc':>9} {'seconds':>8}")
    for name in ("default", "search"):
        a = figures[name]
        print(
            f"{name:<8} {a['validation_macro_f1']:>12.4f} {a['test_macro_f1']:>13.4f} "
            f"{a['test_accuracy']:>9.4f} {a['train_seconds']:>8.1f}"
        )
    print(f"winner: {searched['chosen']}")
    print(f"trials by outcome: {searched['states']} (budget {n})")
    print(f"test macro-F1 gain (search - default): {figures['test_macro_f1_gain']:+.4f}")
    print(
        f"search wall time / ({n} x default training): "
        f"{figures['search_seconds_vs_n_trials_default_trainings']:.2f}"
    )
    print(f"trial time saved by pruning: {searched['saved_by_pruning']:.1%} (goal >= 30%)")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2, default=str))


if __name__ == "__main__":
    main()
