"""Wall time of each pipeline stage and the orchestration overhead, on the embedded default.

Runs the retrain flow once (Prefect's temporary API, MLflow on a throwaway SQLite store) and
prints each stage's time (the `time/*` metrics the stages log), the flow's wall
time, and overhead = flow wall time - sum of stage times (Prefect task orchestration plus
MLflow run bookkeeping between stages), as a share of the flow. The temporary Prefect server's
start-up is timed separately with an empty flow, since a deployed worker does not pay it.

    .venv/bin/python benchmarks/pipeline_stages.py [--config configs/default.yaml] [--set K=V ...]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient
from prefect import flow

from flows.retrain import STAGE_NAMES, retrain_flow

ROOT = Path(__file__).resolve().parents[1]


@flow(name="noop")
def noop() -> None:
    """Empty flow: its first call starts Prefect's temporary server."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()

    store = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    uri = f"sqlite:///{store / 'mlflow.db'}"
    overrides = [
        f"tracking.uri={uri}",
        f"tracking.artifact_location={(store / 'art').as_uri()}",
        f"output_dir={store / 'outputs'}",
        *args.overrides,
    ]

    start = time.perf_counter()
    noop()
    server_start = time.perf_counter() - start

    start = time.perf_counter()
    result = retrain_flow(
        config_path=str(ROOT / args.config) if not Path(args.config).is_absolute() else args.config,
        overrides=overrides,
    )
    flow_wall = time.perf_counter() - start

    metrics = MlflowClient(uri).get_run(result["run_id"]).data.metrics
    stages = {name: metrics[f"time/{name}"] for name in STAGE_NAMES if f"time/{name}" in metrics}
    stage_sum = sum(stages.values())
    overhead = flow_wall - stage_sum

    print(f"\nPipeline on {args.config} (store: {store})")
    print(f"{'stage':<16}{'seconds':>10}{'share':>9}")
    for name, seconds in stages.items():
        print(f"{name:<16}{seconds:>10.2f}{seconds / flow_wall:>9.1%}")
    print(f"{'sum of stages':<16}{stage_sum:>10.2f}{stage_sum / flow_wall:>9.1%}")
    print(f"{'overhead':<16}{overhead:>10.2f}{overhead / flow_wall:>9.1%}")
    print(f"{'flow wall':<16}{flow_wall:>10.2f}")
    print(f"\nprefect_temporary_server_start_seconds = {server_start:.2f}")
    print(f"flow_wall_seconds = {flow_wall:.2f}")
    print(f"orchestration_overhead_seconds = {overhead:.2f}")
    print(f"orchestration_overhead_share = {overhead / flow_wall:.3f}  (goal < 0.10)")
    print(
        f"test_{result['metric']} = {result['test_score']:.4f}  "
        f"served_{result['metric']} = {result['served_score']:.4f}"
    )


if __name__ == "__main__":
    main()
