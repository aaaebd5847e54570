"""prefect.yaml and docker-compose.yml are valid and point at real code."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prefect.client.schemas.schedules import CronSchedule
from prefect.flows import load_flow_from_entrypoint

ROOT = Path(__file__).resolve().parents[1]


def _deployments() -> dict[str, dict]:
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    return {d["name"]: d for d in spec["deployments"]}


def test_prefect_deployments_load_their_flow_and_parameters(monkeypatch):
    monkeypatch.chdir(ROOT)
    deployments = _deployments()
    assert {"nightly", "adhoc"} <= set(deployments)
    for deployment in deployments.values():
        flow = load_flow_from_entrypoint(deployment["entrypoint"])
        assert flow.name == "lora-retrain"
        assert (
            flow.validate_parameters(deployment.get("parameters", {}))["config_path"]
            == "configs/default.yaml"
        )
        assert deployment["work_pool"]["name"] == "cpu"


def test_nightly_has_a_valid_cron_schedule_and_adhoc_none():
    deployments = _deployments()
    schedule = deployments["nightly"]["schedules"][0]
    assert CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"]).cron == "0 2 * * *"
    assert "schedules" not in deployments["adhoc"]


def test_docker_compose_file_is_valid():
    binary = shutil.which("docker-compose")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail(
                "docker-compose is not installed; .ci/run installs it "
                "(apt-get install docker-compose)"
            )
        pytest.skip("docker-compose not installed (apt-get install docker-compose)")
    result = subprocess.run(
        [binary, "--env-file", ".env.example", "config", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_docker_compose_requires_secrets_from_the_environment():
    spec = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = spec["services"]
    assert {"postgres", "minio", "mlflow", "prefect-server", "worker-cpu"} <= set(services)
    password = services["postgres"]["environment"]["POSTGRES_PASSWORD"]
    assert password.startswith(
        "${POSTGRES_PASSWORD:?"
    )  # no default: compose refuses to start without it
    for service in services.values():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{port} listens beyond loopback"
