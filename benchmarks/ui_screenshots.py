"""Screenshots of the MLflow UI on a finished pipeline run, with headless Chromium (a manual check).

Without --tracking-uri it first makes a run of its own: a tiny random BERT (testkit/tiny.py) on
the demo data, `python -m flows.cli run` with a tiny config, in a throwaway store. Then it starts
`mlflow ui` on a free loopback port over the store and takes PNGs (classic training view,
`?workflowType=machine_learning`) of the experiment's runs, the run page, the run's model-metrics
tab (chart sections, opening on the first), the training curves (the metric page with every
loss logged at more than one step: train/loss, eval/loss) and the registered model version
page, and stops the server. About 2.5 minutes on 2 cores with the tiny run, 1 without.

    .venv/bin/python benchmarks/ui_screenshots.py [--out benchmarks/results/ui-screenshots]
        [--tracking-uri sqlite:///mlruns/mlflow.db --experiment lora-retrain]
        [--run-id ID] [--window-size 1600,1000] [--budget-ms 15000]

Needs Debian's chromium (`apt-get install -y chromium`); not part of CI.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote, urlencode

import pandas as pd
import yaml
from mlflow.tracking import MlflowClient

from tasks.common.processes import ProcessGroup, start_group
from testkit.tiny import build_tiny_bert, tiny_config_dict

ROOT = Path(__file__).resolve().parents[1]
DEMO_CSV = ROOT / "data" / "demo" / "support_tickets.csv"
ML_VIEW = "workflowType=machine_learning"  # MLflow 3 opens in GenAI mode without it


def tiny_config(work: Path) -> Path:
    """A config that runs every stage in about a minute on a tiny BERT, in `work`."""
    model = build_tiny_bert(work / "tiny-bert", list(pd.read_csv(DEMO_CSV)["text"]))
    config = tiny_config_dict(work, model, DEMO_CSV)
    config["train"] |= {"epochs": 3, "logging_steps": 5}  # curves worth a look
    config["registry"]["model_name"] = "ui-check-classifier"
    config["tracking"] = {
        "uri": f"sqlite:///{work / 'store' / 'mlflow.db'}",
        "experiment": "ui-check",
        "artifact_location": (work / "store" / "artifacts").as_uri(),
    }
    (work / "store").mkdir(parents=True, exist_ok=True)
    path = work / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def make_run(work: Path) -> tuple[str, str]:
    """Run the pipeline on the tiny config; its (tracking URI, experiment name)."""
    config = tiny_config(work)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "MLFLOW_"))}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    print(f"running the pipeline on a tiny BERT ({config}) ...", flush=True)
    subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--config", str(config)],
        cwd=ROOT,
        env=env,
        check=True,
        timeout=1800,
    )
    settings = yaml.safe_load(config.read_text())["tracking"]
    return settings["uri"], settings["experiment"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ui(uri: str, port: int, log: Path) -> ProcessGroup:
    """`mlflow ui` over the store on 127.0.0.1:port, ready; it dies with this script."""
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri]
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with open(log, "wb") as out:
        group = start_group(command, grace_s=10, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if group.process.poll() is not None:
            raise RuntimeError(f"mlflow ui exited with {group.process.returncode}; see {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return group
        except OSError:
            time.sleep(0.5)
    group.stop()
    raise RuntimeError(f"mlflow ui did not answer in 180 s; see {log}")


def latest_run(client: MlflowClient, experiment_id: str, experiment: str) -> str:
    runs = client.search_runs(
        [experiment_id],
        "attributes.status = 'FINISHED'",
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    if not runs:
        raise SystemExit(f"error: no finished run in experiment {experiment!r}")
    return runs[0].info.run_id


def curves_url(client: MlflowClient, run, base: str) -> str | None:
    """The classic metric page with every loss curve (metrics logged at more than one step)."""
    keys = sorted(
        key
        for key in run.data.metrics
        if "loss" in key and len(client.get_metric_history(run.info.run_id, key)) > 1
    )
    if not keys:
        return None
    query = {
        "runs": json.dumps([run.info.run_id]),
        "metric": json.dumps(keys[0]),
        "experiments": json.dumps([run.info.experiment_id]),
        "plot_metric_keys": json.dumps(keys),
        "x_axis": "step",
        "workflowType": "machine_learning",
    }
    return f"{base}/#/metric/{quote(keys[0], safe='')}?{urlencode(query)}"


def pages(client: MlflowClient, experiment: str, run_id: str | None, base: str) -> dict[str, str]:
    """name -> URL of each page to capture, for the experiment's latest finished run (or run_id)."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise SystemExit(f"error: no experiment {experiment!r} in the store")
    run = client.get_run(run_id or latest_run(client, found.experiment_id, experiment))
    page = f"{base}/#/experiments/{found.experiment_id}/runs/{run.info.run_id}"
    urls = {
        "experiment-runs": f"{base}/#/experiments/{found.experiment_id}/runs?{ML_VIEW}",
        "run-overview": f"{page}?{ML_VIEW}",
        "run-model-metrics": f"{page}/model-metrics?{ML_VIEW}",
    }
    if (curves := curves_url(client, run, base)) is not None:
        urls["training-curves"] = curves
    versions = client.search_model_versions(f"run_id = '{run.info.run_id}'")
    if versions:
        name, version = versions[0].name, versions[0].version
        urls["model-version"] = f"{base}/#/models/{quote(name)}/versions/{version}?{ML_VIEW}"
    else:
        print(f"run {run.info.run_id} registered no model version: no version page")
    return urls


def screenshot(url: str, png: Path, window: str, budget_ms: int) -> None:
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
        command += [f"--user-data-dir={profile}", f"--window-size={window}"]
        command += [f"--virtual-time-budget={budget_ms}", f"--screenshot={png}", url]
        subprocess.run(command, check=True, capture_output=True, timeout=300)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/ui-screenshots")
    parser.add_argument("--tracking-uri", help="an existing store (default: make a tiny run)")
    parser.add_argument("--experiment", default="lora-retrain")
    parser.add_argument("--run-id", help="default: the experiment's latest finished run")
    parser.add_argument("--window-size", default="1600,1000", help="WIDTH,HEIGHT")
    parser.add_argument("--budget-ms", type=int, default=15000)
    args = parser.parse_args()
    if not (shutil.which("chromium") or Path("/usr/bin/chromium").exists()):
        raise SystemExit("error: no chromium; apt-get install -y chromium")

    work = Path(tempfile.mkdtemp(prefix="ui-screenshots-"))
    uri, experiment = args.tracking_uri, args.experiment
    if uri is None:
        uri, experiment = make_run(work)
    args.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = start_ui(uri, port, work / "mlflow-ui.log")
    try:
        base = f"http://127.0.0.1:{port}"
        for name, url in pages(MlflowClient(uri), experiment, args.run_id, base).items():
            png = args.out / f"{name}.png"
            screenshot(url, png, args.window_size, args.budget_ms)
            print(f"{png}  <- {url}")
    finally:
        server.stop()
    print(f"store: {uri} (again without a new run: --tracking-uri {uri} --experiment {experiment})")


if __name__ == "__main__":
    main()
