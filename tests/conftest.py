"""Shared fixtures: a tiny random BERT with a locally built tokenizer, small data, a config."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from testkit.tiny import build_tiny_bert, tiny_config_dict

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("MLFLOW_TRACKING_URI", None)  # tests never write to a user's tracking server
# Planted credentials: tests/test_security.py checks none of them reaches MLflow.
PLANTED_SECRET = "PLANTED-SECRET-7f3a9c"
for _name in ("AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD", "PREFECT_API_KEY"):
    os.environ[_name] = PLANTED_SECRET

ROOT = Path(__file__).resolve().parents[1]
DEMO_CSV = ROOT / "data" / "demo" / "support_tickets.csv"


@pytest.fixture(scope="session")
def planted_secret() -> str:
    return PLANTED_SECRET


@pytest.fixture(scope="session")
def demo_frame() -> pd.DataFrame:
    return pd.read_csv(DEMO_CSV)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory, demo_frame) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), list(demo_frame["text"]))


@pytest.fixture(scope="session")
def small_csv(tmp_path_factory, demo_frame) -> Path:
    """200 demo rows, 4 classes (50 each): small enough for fast stage tests."""
    frame = demo_frame[demo_frame["label"] != "returns"].groupby("label").head(50)
    path = tmp_path_factory.mktemp("data") / "tickets.csv"
    frame.sample(frac=1.0, random_state=0).to_csv(path, index=False)
    return path


@pytest.fixture(scope="session")
def cli():
    """`python -m flows.cli` as children forked from one process that imported it once."""
    from testkit.cli import CliLauncher

    launcher = CliLauncher()
    yield launcher
    launcher.close()


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """A Prefect API server (PREFECT_API_URL) for CLI runs: none starts a temporary one."""
    from tasks.common.served_model import free_port
    from testkit.servers import prefect_server

    port = free_port()
    server = prefect_server(tmp_path_factory.mktemp("prefect-server"), port)
    yield f"http://127.0.0.1:{port}/api"
    server.stop()


@pytest.fixture(scope="session")
def make_tiny_config(tiny_bert, small_csv):
    """Build a validated tiny config writing under a given folder (overrides merged in)."""
    from tasks.common.config import apply_overrides, config_from_dict

    def make(tmp: Path, overrides: list[str] = ()):
        return config_from_dict(
            apply_overrides(tiny_config_dict(tmp, tiny_bert, small_csv), list(overrides))
        )

    return make


@pytest.fixture
def tiny_config(tmp_path, make_tiny_config):
    return make_tiny_config(tmp_path)


def pytest_sessionfinish(session, exitstatus):
    """Stop Prefect's temporary server while pytest's streams are still open (quiet exit)."""
    try:
        from prefect.server.api.server import SubprocessASGIServer
    except ImportError:
        return
    for server in list(SubprocessASGIServer._instances.values()):
        server.stop()


def data_figures(client, run_id: str) -> dict[str, float]:
    """prepare_data's figure/value table (rows.<split>, dropped.<reason>, truncated.<split>)."""
    from tasks.common.datasets import DATA_PROFILE_FILE

    table = json.loads(Path(client.download_artifacts(run_id, DATA_PROFILE_FILE)).read_text())
    assert table["columns"] == ["figure", "value"]
    return dict(table["data"])


def tracked(config, run_id: str, **records):
    """A pipeline run for tests: its records, its store's client and helpers on one object."""
    from types import SimpleNamespace

    from tasks.common.stage import StageContext
    from tasks.common.tracking import Tracking

    tracking = Tracking.connect(config.tracking)
    run = tracking.run(run_id)
    return SimpleNamespace(
        config=config,
        run_id=run_id,
        tracking=tracking,
        client=tracking.client,
        fetch=run.fetch,
        text=lambda path: Path(tracking.client.download_artifacts(run_id, path)).read_text(),
        figures=lambda: data_figures(tracking.client, run_id),
        stage=StageContext(config, run, "test", model_mb=0.0),  # for a kind's helpers
        **records,
    )


@pytest.fixture
def run(tiny_run):
    """The session's tiny pipeline run (tests read it, never change it)."""
    return tiny_run


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, make_tiny_config):
    """Every stage once, in pipeline order, on the tiny BERT; tests read (not change) it."""
    from dataclasses import fields

    from flows.retrain import run_stages
    from tasks.common.tracking import start_pipeline_run

    tmp = tmp_path_factory.mktemp("pipeline")
    config = make_tiny_config(tmp)
    run_id = start_pipeline_run(config)
    out = run_stages(config, run_id)
    records = {f.name: getattr(out, f.name) for f in fields(out)}
    run = tracked(config, run_id, tmp=tmp, gates=out.gates, **records)
    run.label_names = json.loads((run.fetch(out.data.dataset) / "label_names.json").read_text())
    return run
