"""prefect.yaml, docker-compose.yml and deploy/kubernetes are valid and point at real code."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.schedules import CronSchedule
from prefect.flows import load_flow_from_entrypoint
from prefect.utilities.templating import apply_values, find_placeholders

from tasks.common.config import DistributedConfig

ROOT = Path(__file__).resolve().parents[1]


def _deployments() -> dict[str, dict]:
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    return {d["name"]: d for d in spec["deployments"]}


# deployment name -> (flow name, work pool)
EXPECTED = {
    "nightly": ("lora-retrain", "cpu"),
    "adhoc": ("lora-retrain", "cpu"),
    "causal-weekly": ("lora-retrain", "cpu"),
    "weekly-search": ("lora-retrain", "cpu"),
    "on-data": ("lora-retrain", "cpu"),
    "gpu": ("lora-train", "gpu"),
    "every-15-minutes": ("lora-watch", "cpu"),
    "manual": ("lora-promote", "cpu"),
}


def test_prefect_deployments_load_their_flow_and_parameters(monkeypatch):
    monkeypatch.chdir(ROOT)
    deployments = _deployments()
    assert set(deployments) == set(EXPECTED)
    for name, deployment in deployments.items():
        flow = load_flow_from_entrypoint(deployment["entrypoint"])
        assert (flow.name, deployment["work_pool"]["name"]) == EXPECTED[name], name
        if flow.name == "lora-train":  # every parameter comes from the retrain flow's call
            assert "parameters" not in deployment
            continue
        params = flow.validate_parameters(deployment["parameters"])
        expected = "configs/causal_lm.yaml" if name == "causal-weekly" else "configs/default.yaml"
        assert params["config_path"] == expected, name


def test_retrain_deployments_send_training_to_the_gpu_deployment(monkeypatch):
    from tasks.common.config import load_config

    monkeypatch.chdir(ROOT)
    deployments = _deployments()
    for name in ("nightly", "adhoc", "causal-weekly", "weekly-search", "on-data"):
        params = deployments[name]["parameters"]
        config = load_config(params["config_path"], params.get("overrides"))
        assert config.train.deployment == "lora-train/gpu", name
        assert config.search.enabled == (name == "weekly-search"), name


def test_each_gpu_worker_runs_one_training_at_a_time_and_the_nodes_of_one_run_together():
    # a deployment limit of 1 would queue node 1 of a two-node training behind node 0, which
    # waits for it in the rendezvous: the limit is per worker (one per GPU node) instead
    assert "concurrency_limit" not in _deployments()["gpu"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert "--limit 1" in compose["services"]["worker-gpu"]["command"]


def test_nightly_and_weekly_have_valid_cron_schedules_and_the_others_none():
    deployments = _deployments()
    crons = {
        "nightly": "0 2 * * *",
        "weekly-search": "0 4 * * 6",
        "causal-weekly": "0 3 * * 0",
        "every-15-minutes": "*/15 * * * *",
    }
    for name, cron in crons.items():
        schedule = deployments[name]["schedules"][0]
        assert CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"]).cron == cron
    scheduled = [n for n, d in deployments.items() if d.get("schedules")]
    assert scheduled == ["nightly", "weekly-search", "causal-weekly", "every-15-minutes"]


def test_the_on_data_trigger_hears_retrainable_watch_events_and_debounces_them():
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

    [spec] = _deployments()["on-data"]["triggers"]
    trigger = DeploymentEventTrigger(**spec)
    assert trigger.expect == {"lora.data.changed", "lora.drift.detected"}
    assert trigger.match.model_dump() == {
        "prefect.resource.id": "lora.model.*",
        "lora.retrain": "true",
    }
    assert trigger.posture == "Reactive" and trigger.threshold == 1
    assert trigger.within.total_seconds() == trigger.schedule_after.total_seconds() == 300
    assert set(trigger.parameters["trigger"]) >= {"event", "id", "new_rows", "data_sha256"}


def test_the_compose_workers_and_database_hold_the_search_studies():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for worker in ("worker-cpu", "worker-gpu"):
        storage = compose["services"][worker]["environment"]["LORA_SEARCH_STORAGE"]
        assert storage.startswith("postgresql+psycopg2://") and storage.endswith(
            "@postgres:5432/optuna"
        )
    assert "CREATE DATABASE optuna;" in (ROOT / "docker/postgres-init.sql").read_text()
    for image in ("worker.Dockerfile", "worker-gpu.Dockerfile"):
        assert "'.[postgres]'" in (ROOT / "docker" / image).read_text()


def test_workers_resolve_the_checkout_at_run_time():
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    step = spec["pull"][0]["prefect.deployments.steps.set_working_directory"]
    assert step["directory"] == "{{ $LORA_RETRAIN_HOME }}"


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


def _compose_services() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


def test_docker_compose_requires_secrets_from_the_environment():
    services = _compose_services()
    assert {
        "postgres",
        "minio",
        "create-bucket",
        "mlflow",
        "prefect-server",
        "worker-cpu",
        "worker-gpu",
    } <= set(services)
    password = services["postgres"]["environment"]["POSTGRES_PASSWORD"]
    assert password.startswith(
        "${POSTGRES_PASSWORD:?"
    )  # no default: compose refuses to start without it
    for name, service in services.items():
        for key, value in service.get("environment", {}).items():
            if any(word in key for word in ("PASSWORD", "SECRET")):
                assert str(value).startswith("${"), f"{name}.{key} is not from the environment"
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{port} listens beyond loopback"


def test_docker_compose_services_have_health_checks_and_named_volumes():
    spec = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for name, service in spec["services"].items():
        if name != "create-bucket":  # a one-shot job
            assert "healthcheck" in service, name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source.startswith("./") or source in spec["volumes"], (name, volume)
    assert {"postgres-data", "minio-data"} <= set(spec["volumes"])


def test_docker_compose_mlflow_uses_postgres_and_proxies_artifacts_to_the_bucket():
    services = _compose_services()
    command = " ".join(services["mlflow"]["command"].split())
    assert "--backend-store-uri postgresql+psycopg2://" in command
    assert "--serve-artifacts" in command and "--artifacts-destination s3://" in command
    assert services["mlflow"]["depends_on"]["create-bucket"] == {
        "condition": "service_completed_successfully"
    }
    prefect_db = services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert prefect_db.startswith("postgresql+asyncpg://")


def test_docker_compose_workers_serve_their_pools_and_the_gpu_one_reserves_a_gpu():
    services = _compose_services()
    assert "--pool cpu" in services["worker-cpu"]["command"]
    assert "--pool gpu" in services["worker-gpu"]["command"]
    devices = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    for name in ("worker-cpu", "worker-gpu"):
        assert services[name]["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert services["worker-gpu"]["environment"]["LORA_TRAIN_OUTPUT_DIR"]


def test_worker_images_run_as_non_root_and_the_gpu_one_has_cuda():
    for name in ("worker.Dockerfile", "worker-gpu.Dockerfile"):
        lines = (ROOT / "docker" / name).read_text().splitlines()
        users = [line.split()[1] for line in lines if line.startswith("USER ")]
        assert users and users[-1] not in ("root", "0"), name
    gpu = (ROOT / "docker" / "worker-gpu.Dockerfile").read_text()
    assert "nvidia/cuda:" in gpu and "onnxruntime-gpu" in gpu and "whl/cu" in gpu


def test_docker_compose_servers_require_authentication():
    services = _compose_services()
    mlflow = services["mlflow"]
    assert "mlflow server --app-name basic-auth" in mlflow["command"]
    for key in ("MLFLOW_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert mlflow["environment"][key].startswith("${"), key  # from the environment only
        assert ":?" in mlflow["environment"][key], key  # no default: refuses to start without it
    prefect = services["prefect-server"]["environment"]["PREFECT_SERVER_API_AUTH_STRING"]
    assert prefect.startswith("${PREFECT_AUTH_STRING:?")
    for worker in ("worker-cpu", "worker-gpu"):
        env = services[worker]["environment"]
        assert env["PREFECT_API_AUTH_STRING"] == "${PREFECT_AUTH_STRING}"
        assert env["MLFLOW_TRACKING_PASSWORD"] == "${MLFLOW_ADMIN_PASSWORD}"


K8S = ROOT / "deploy" / "kubernetes"


def _k8s_template() -> dict:
    return json.loads((K8S / "gpu-work-pool.json").read_text())


def test_the_kubernetes_gpu_template_declares_every_value_it_uses():
    template = _k8s_template()
    WorkPoolCreate(name="gpu-k8s", type="kubernetes", base_job_template=template)  # Prefect's check
    used = {p.name for p in find_placeholders(template["job_configuration"])}
    declared = set(template["variables"]["properties"])
    assert used == declared, (used - declared, declared - used)


def test_the_kubernetes_gpu_pod_asks_for_gpus_shm_the_gpu_nodes_and_the_rendezvous_port():
    template = _k8s_template()
    defaults = {k: v.get("default") for k, v in template["variables"]["properties"].items()}
    rendered = apply_values(template["job_configuration"], {**defaults, "gpus": 4})
    pod = rendered["job_manifest"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 4
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    port = int(DistributedConfig().rdzv_endpoint.rsplit(":", 1)[1])
    assert container["ports"] == [{"name": "rendezvous", "containerPort": port}]
    assert pod["restartPolicy"] == "Never"  # restarts are torchrun's (max_restarts)


def test_the_kubernetes_rendezvous_store_serves_the_templates_port():
    deployment, service = yaml.safe_load_all((K8S / "rendezvous.yaml").read_text())
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    module = container["command"][container["command"].index("-m") + 1]
    assert (ROOT / (module.replace(".", "/") + ".py")).is_file()
    port = _k8s_template()["variables"]["properties"]["rendezvous_port"]["default"]
    assert service["spec"]["ports"][0]["port"] == port
    assert container["command"][-1] == str(port)
