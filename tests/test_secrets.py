"""Credentials never reach Prefect: not its flow-run parameters, logs, artifacts or database.

They come from the environment (MLFLOW_TRACKING_USERNAME / _PASSWORD) or a Prefect Secret
block; the CLI moves those of a `tracking.uri=http://user:password@host` override into the
environment before the flow starts, and the flow refuses overrides that carry any.
"""

from __future__ import annotations

import json
import os
import sqlite3

import pytest
import yaml
from prefect import flow

import flows.train as train_module
from flows.retrain import retrain_flow
from tasks.common.config import TrackingConfig
from tasks.common.credentials import (
    PASSWORD_ENV,
    USER_ENV,
    load_credentials,
    move_credentials_to_environment,
    scrubbed,
)
from tasks.common.errors import ConfigError
from tasks.common.served_model import free_port
from testkit.servers import mlflow_server


def test_the_flow_refuses_overrides_with_credentials(planted_secret):
    with pytest.raises(ConfigError) as err:
        retrain_flow("configs/default.yaml", [f"tracking.uri=https://bob:{planted_secret}@h"])
    assert str(err.value) == (
        "override tracking.uri=... carries credentials in a URL; Prefect stores flow-run "
        "parameters in plain text, so the flow refuses them: set MLFLOW_TRACKING_USERNAME and "
        "MLFLOW_TRACKING_PASSWORD in the environment, or name a Prefect Secret block holding "
        "'user:password' in tracking.credentials_block"
    )
    assert planted_secret not in str(err.value)


def test_the_cli_moves_url_credentials_into_the_environment(monkeypatch, planted_secret):
    monkeypatch.delenv(USER_ENV, raising=False)
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    clean = move_credentials_to_environment(
        ["train.epochs=1", f"tracking.uri=https://bob:{planted_secret}@mlflow.example.com/x"]
    )
    assert clean == ["train.epochs=1", "tracking.uri=https://mlflow.example.com/x"]
    assert os.environ[USER_ENV] == "bob" and os.environ[PASSWORD_ENV] == planted_secret
    with pytest.raises(ConfigError, match=r"^override data.path=\.\.\. carries credentials"):
        move_credentials_to_environment([f"data.path=https://bob:{planted_secret}@h/d.csv"])


def test_the_training_deployment_gets_a_config_without_credentials(
    make_tiny_config, tmp_path, monkeypatch, planted_secret
):
    config = make_tiny_config(tmp_path, [f"tracking.uri=http://bob:{planted_secret}@127.0.0.1:9"])
    sent = {}

    def run_deployment(name, parameters, **kwargs):
        sent.update(parameters)
        raise RuntimeError("stop here")

    @flow
    def hand_over():
        train_module.train_on_deployment(config, _no_data(), "run-1")

    monkeypatch.setattr(train_module, "run_deployment", run_deployment)
    with pytest.raises(RuntimeError, match="stop here"):
        hand_over()
    assert planted_secret not in json.dumps(sent)
    assert sent["config"]["tracking"]["uri"] == "http://127.0.0.1:9"
    assert scrubbed({"a": [f"s3://k:{planted_secret}@b/x"]}) == {"a": ["s3://b/x"]}


def _no_data():
    from tasks.common.tracking import ArtifactRef
    from tasks.records import PreparedData

    return PreparedData(ArtifactRef("run-1", "data", "/nowhere"), {"train": 1}, "sha")


def test_credentials_come_from_a_prefect_secret_block(monkeypatch, planted_secret):
    from prefect.blocks.system import Secret

    monkeypatch.delenv(USER_ENV, raising=False)
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    Secret(value=f"carol:{planted_secret}").save("test-mlflow-credentials", overwrite=True)
    load_credentials(TrackingConfig(credentials_block="test-mlflow-credentials"))
    assert os.environ[USER_ENV] == "carol" and os.environ[PASSWORD_ENV] == planted_secret
    with pytest.raises(ConfigError, match=r"^tracking.credentials_block 'nope': no such Prefect"):
        load_credentials(TrackingConfig(credentials_block="nope"))


@pytest.mark.e2e
def test_a_run_with_url_credentials_leaves_none_in_prefect(make_tiny_config, tmp_path, cli):
    """The whole CLI run against a tracking server; then Prefect's database is searched."""
    secret = "PLANTED-PREFECT-SECRET-91c2"
    store, port = tmp_path / "store", free_port()
    store.mkdir()
    config = make_tiny_config(tmp_path, ["train.epochs=1", "tracking.artifact_location=null"])
    path = tmp_path / "config.yaml"
    tree = config.model_dump(mode="json")
    tree["tracking"]["uri"] = None
    path.write_text(yaml.safe_dump(tree))
    home = tmp_path / "prefect-home"
    server = mlflow_server(store, port)
    try:
        result = cli.run(  # a process forked from one that imported the CLI (testkit/cli.py)
            ["run", "--config", str(path), "--set"]
            + [f"tracking.uri=http://alice:{secret}@127.0.0.1:{port}"],
            env={**os.environ, "PREFECT_HOME": str(home)},
            timeout=900,
        )
    finally:
        server.stop()
    assert result.returncode == 0, result.stderr[-3000:]
    assert secret not in result.stdout + result.stderr
    database = sqlite3.connect(home / "prefect.db")
    tables = [t for (t,) in database.execute("select name from sqlite_master where type='table'")]
    leaked = [
        table
        for table in tables
        if any(secret in repr(row) for row in database.execute(f'select * from "{table}"'))
    ]
    runs = database.execute("select parameters from flow_run").fetchall()
    assert runs and leaked == []
    assert any(f"127.0.0.1:{port}" in params for (params,) in runs)  # the clean URI is there
