"""The production topology as real processes on 127.0.0.1, started and stopped by this test.

docker-compose.yml runs these as containers; with no Docker engine here they run natively:
a throwaway PostgreSQL cluster (databases `mlflow` and `prefect`), `mlflow server` on it with a
local artifact folder served through the server, `prefect server start` on it, one process
worker for the `cpu` pool and two for `gpu` (two GPU nodes), `prefect deploy --all` from this
checkout, then `prefect deployment run 'lora-retrain/adhoc' --watch` with a tiny config that
the deployment's own overrides send through `lora-train/gpu`, trained on both nodes (DDP, one
rank each). Each worker has its own output folder, so the data and the adapter can only travel
through the MLflow artifact store. Then a two-node run is cancelled, and another loses a worker.

Needs PostgreSQL's server binaries (initdb, postgres: Debian's `postgresql` package; .ci/run
installs it) and psycopg2 (the `test` extra).
"""

from __future__ import annotations

import glob
import importlib.metadata
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from test_processes import marked_processes, wait_until

from tasks.common.served_model import free_port
from tasks.search.study import best_trial

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
PREFECT = [sys.executable, "-m", "prefect"]
MLFLOW = [sys.executable, "-m", "mlflow"]
DB_USER = "lora"
DB_PASSWORD = "test-only-password"  # a throwaway cluster on loopback, deleted afterwards
DOCKER_STOP_GRACE_S = 10  # docker stop: SIGTERM, then SIGKILL after this grace (compose default)
MODEL_NAME = "tiny-classifier"
WORKERS = ("cpu", "gpu0", "gpu1")  # two gpu nodes, one training run at a time each
TWO_NODES = [  # training on both gpu nodes, one rank each, meeting on 127.0.0.1
    "train.distributed.strategy=ddp",
    "train.distributed.nnodes=2",
    "train.distributed.nproc_per_node=1",
    "train.distributed.join_timeout_s=60",  # also how long a rank waits for a dead peer
]


def _pg_binary(name: str) -> str | None:
    """A PostgreSQL server binary: on PATH, else Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which(name)
    if found:
        return found
    candidates = glob.glob(f"/usr/lib/postgresql/*/bin/{name}")
    candidates.sort(key=lambda p: int(re.search(r"/(\d+)/bin/", p).group(1)))
    return candidates[-1] if candidates else None


def _wait_for(what: str, check: Callable[[], bool], timeout: float, alive=None) -> None:
    """Poll `check` until true; fail after `timeout` s or as soon as the process `alive` died."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except (OSError, urllib.error.URLError, ValueError):
            pass
        if alive is not None and alive.poll() is not None:
            raise AssertionError(f"{what}: the process exited with {alive.returncode}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not ready after {timeout:.0f} s")
        time.sleep(0.5)


def _get_json(url: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status == 200


class Processes:
    """Servers and workers, each in its own session, stopped in reverse order (always)."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.started: list[tuple[str, subprocess.Popen, int]] = []

    def start(self, name: str, argv: list[str], env: dict, stop_signal=signal.SIGTERM, **kw):
        log = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 - closed by the child
        try:
            process = subprocess.Popen(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **kw,
            )
        finally:
            log.close()
        self.started.append((name, process, stop_signal))
        return process

    def stop_all(self) -> None:
        for _name, process, stop_signal in reversed(self.started):
            if process.poll() is None:
                try:
                    os.killpg(process.pid, stop_signal)
                    process.wait(timeout=30)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    pass
            try:  # anything left in the group (flow-run subprocesses of a worker)
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.started.clear()

    def logs(self, chars: int = 4000) -> str:
        parts = []
        for log in sorted(self.log_dir.glob("*.log")):
            parts.append(
                f"----- {log.name} (tail) -----\n{log.read_text(errors='replace')[-chars:]}"
            )
        return "\n".join(parts)


def _start_postgres(procs: Processes, work: Path) -> int:
    """initdb a throwaway cluster (as `postgres` when we are root), start it, create the DBs."""
    initdb, postgres = _pg_binary("initdb"), _pg_binary("postgres")
    if not (initdb and postgres):
        pytest.fail(
            "PostgreSQL server binaries not found (initdb, postgres): "
            "apt-get install postgresql (.ci/run does)"
        )
    as_user: dict = {}
    if os.geteuid() == 0:  # postgres refuses to run as root
        owner = "postgres" if _user_exists("postgres") else "nobody"
        as_user = {"user": owner, "group": pwd.getpwnam(owner).pw_gid, "extra_groups": []}
    pg_dir = Path(tempfile.mkdtemp(prefix="lora-pg-", dir="/tmp"))  # short socket path
    (pg_dir / "pw").write_text(DB_PASSWORD + "\n")
    if as_user:
        for path in (pg_dir, pg_dir / "pw"):
            os.chown(path, pwd.getpwnam(as_user["user"]).pw_uid, as_user["group"])
    work.joinpath("pg_dir").write_text(str(pg_dir))
    subprocess.run(
        [initdb, "-D", str(pg_dir / "data"), "-U", DB_USER, f"--pwfile={pg_dir / 'pw'}",
         "--auth=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync"],
        check=True, capture_output=True, timeout=120, cwd=pg_dir, **as_user,
    )  # fmt: skip
    port = free_port()
    server = procs.start(
        "postgres",
        [postgres, "-D", str(pg_dir / "data"), "-p", str(port), "-k", str(pg_dir),
         "-c", "listen_addresses=127.0.0.1", "-c", "max_connections=200",
         "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
        env={"PATH": os.environ.get("PATH", ""), "LC_ALL": "C"},
        stop_signal=signal.SIGINT,  # "fast" shutdown: disconnect clients, stop
        cwd=pg_dir,
        **as_user,
    )  # fmt: skip
    import psycopg2

    def create_databases() -> bool:
        try:
            conn = psycopg2.connect(
                host="127.0.0.1", port=port, user=DB_USER, password=DB_PASSWORD,
                dbname="postgres", connect_timeout=3,
            )  # fmt: skip
        except psycopg2.OperationalError:
            return False
        conn.autocommit = True
        with conn.cursor() as cursor:
            for name in ("mlflow", "prefect", "optuna"):
                cursor.execute(f"CREATE DATABASE {name}")
        conn.close()
        return True

    _wait_for("PostgreSQL", create_databases, timeout=60, alive=server)
    return port


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


MARK = uuid.uuid4().hex  # in the environment of every process the stack starts


def _clean_env(**extra: str) -> dict[str, str]:
    """This environment without Prefect/MLflow settings, the venv first on PATH, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env["LORA_TEST_MARK"] = MARK
    env.update(extra)
    return env


def _pause_the_watch(api: str) -> None:
    """The watch's 15-minute schedule would run the default config's watch mid-test, and its
    events would start on-data runs: paused, its scheduled runs deleted."""
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        watch = client.read_deployment_by_name("lora-watch/every-15-minutes")
        client.set_deployment_paused_state(watch.id, True)
        only = DeploymentFilter(id=DeploymentFilterId(any_=[watch.id]))
        for run in client.read_flow_runs(deployment_filter=only):
            client.delete_flow_run(run.id)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, make_tiny_config):
    """Every server and both workers, up; torn down afterwards whatever happened."""
    work = tmp_path_factory.mktemp("production")
    (work / "logs").mkdir()
    procs = Processes(work / "logs")
    try:
        pg_port = _start_postgres(procs, work)
        db = f"{DB_USER}:{DB_PASSWORD}@127.0.0.1:{pg_port}"

        mlflow_port = free_port()
        mlflow_uri = f"http://127.0.0.1:{mlflow_port}"
        mlflow_server = procs.start(
            "mlflow-server",
            [*MLFLOW, "server", "--host", "127.0.0.1",
             "--port", str(mlflow_port), "--workers", "1",
             "--backend-store-uri", f"postgresql+psycopg2://{db}/mlflow",
             "--artifacts-destination", str(work / "artifact-store"), "--serve-artifacts"],
            env=_clean_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),  # no huey runners
            cwd=work,
        )  # fmt: skip
        prefect_port = free_port()
        api_url = f"http://127.0.0.1:{prefect_port}/api"
        prefect_env = {
            "PREFECT_HOME": str(work / "prefect-home"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_CLI_PROMPT": "false",
        }
        prefect_server = procs.start(
            "prefect-server",
            [*PREFECT, "server", "start", "--host", "127.0.0.1",
             "--port", str(prefect_port), "--no-ui"],
            env=_clean_env(
                **prefect_env,
                PREFECT_API_DATABASE_CONNECTION_URL=f"postgresql+asyncpg://{db}/prefect",
                PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="5",  # default 60
            ),
            cwd=work,
        )  # fmt: skip
        _wait_for("mlflow server", lambda: _http_ok(f"{mlflow_uri}/health"), 180, mlflow_server)
        _wait_for("prefect server", lambda: _http_ok(f"{api_url}/health"), 180, prefect_server)

        client_env = _clean_env(**prefect_env, PREFECT_API_URL=api_url)

        def prefect(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
            result = subprocess.run(
                [*PREFECT, *args], env=client_env, cwd=ROOT,
                capture_output=True, text=True, timeout=timeout,
            )  # fmt: skip
            assert result.returncode == 0, (
                f"prefect {' '.join(args)} exited {result.returncode}:\n"
                f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
            )
            return result

        for pool in ("cpu", "gpu"):
            prefect("work-pool", "create", pool, "--type", "process")
        prefect("--no-prompt", "deploy", "--all", timeout=300)
        _pause_the_watch(api_url)

        outputs = {name: work / f"{name}-worker-outputs" for name in WORKERS}
        for name in WORKERS:
            pool = name.rstrip("01")
            worker_env = _clean_env(
                **prefect_env,
                PREFECT_API_URL=api_url,
                PREFECT_WORKER_QUERY_SECONDS="2",
                MLFLOW_TRACKING_URI=mlflow_uri,
                LORA_RETRAIN_HOME=str(ROOT),
                LORA_SEARCH_STORAGE=f"postgresql+psycopg2://{db}/optuna",  # the study database
            )
            if pool == "gpu":  # each gpu node trains in its own folder
                worker_env["LORA_TRAIN_OUTPUT_DIR"] = str(outputs[name])
            procs.start(
                f"worker-{name}",
                [*PREFECT, "worker", "start", "--pool", pool, "--type", "process",
                 "--name", f"{name}-worker", *(["--limit", "1"] if pool == "gpu" else [])],
                env=worker_env,
                cwd=work,  # not the checkout: the pull step must move flow runs there
            )  # fmt: skip
        for pool in ("cpu", "gpu"):
            _wait_for(
                f"worker for pool {pool}",
                lambda pool=pool: _get_json(f"{api_url}/work_pools/{pool}")["status"] == "READY",
                90,
            )

        config = make_tiny_config(
            work,
            [
                "tracking.uri=null",  # the workers' MLFLOW_TRACKING_URI: the server
                "tracking.artifact_location=null",  # the server's proxied artifact store
                "tracking.experiment=production-topology",
                f"output_dir={outputs['cpu']}",
                "output.keep=true",  # the test looks into each worker's working folder
                *TWO_NODES,
                f"train.distributed.rdzv_endpoint=127.0.0.1:{free_port()}",
            ],
        )
        assert config.train.deployment is None  # the deployment's own overrides set it
        config_path = work / "tiny-config.yaml"
        config_path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
        run = prefect(
            "deployment", "run", "lora-retrain/adhoc",
            "--params", json.dumps({"config_path": str(config_path)}),
            "--watch", "--watch-timeout", "600",
            timeout=660,
        )  # fmt: skip
        flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", run.stdout).group(1)
        yield {
            "api": api_url,
            "work": work,
            "run_adhoc": lambda path: prefect(
                "deployment",
                "run",
                "lora-retrain/adhoc",
                "--params",
                json.dumps({"config_path": str(path)}),
            ),  # fmt: skip
            "mlflow_uri": mlflow_uri,
            "optuna_uri": f"postgresql+psycopg2://{db}/optuna",
            "prefect": prefect,
            "outputs": outputs,
            "artifact_store": work / "artifact-store",
            "flow_run_id": flow_run_id,
            "watch_output": run.stdout,
            "logs": work / "logs",
            "procs": procs,
        }
    except BaseException:
        sys.stderr.write(procs.logs())
        raise
    finally:
        procs.stop_all()
        wait_until(lambda: marked_processes(MARK) == [], 60)
        left = marked_processes(MARK)
        for pid in left:  # never leak them, then say so
            os.kill(pid, signal.SIGKILL)
        assert left == [], f"processes of the stack outlived it: {left}"
        pg_dir = work / "pg_dir"
        if pg_dir.exists():
            shutil.rmtree(pg_dir.read_text(), ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_run(stack):
    client = MlflowClient(tracking_uri=stack["mlflow_uri"], registry_uri=stack["mlflow_uri"])
    experiment = client.get_experiment_by_name("production-topology")
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`prefect.flow_run_id` = '{stack['flow_run_id']}'",
    )
    assert len(runs) == 1, stack["procs"].logs()
    return client, runs[0]


def _flow_run(stack, flow_run_id: str) -> dict:
    return _get_json(f"{stack['api']}/flow_runs/{flow_run_id}")


def _deployment(stack, name: str) -> dict:
    return _get_json(f"{stack['api']}/deployments/name/{name}")


def test_both_flow_runs_completed_on_their_own_pools(stack, mlflow_run):
    _, run = mlflow_run
    retrain = _flow_run(stack, stack["flow_run_id"])
    assert retrain["state"]["type"] == "COMPLETED", stack["procs"].logs()
    assert retrain["work_pool_name"] == "cpu"
    assert retrain["deployment_id"] == _deployment(stack, "lora-retrain/adhoc")["id"]
    nodes = _get_json(
        f"{stack['api']}/flow_runs/filter",
        {"flow_runs": {"tags": {"all_": [f"mlflow-run:{run.info.run_id}", "lora-retrain"]}}},
    )
    nodes = [n for n in nodes if n["id"] != stack["flow_run_id"]]
    assert sorted(t for n in nodes for t in n["tags"] if t.startswith("node:")) == [
        "node:0/2",
        "node:1/2",
    ]  # one lora-train flow run per node, each on its own gpu worker
    assert run.data.tags["train.prefect_flow_run_id"] in {n["id"] for n in nodes}
    for train in nodes:
        assert train["state"]["type"] == "COMPLETED"
        assert train["work_pool_name"] == "gpu"
        assert train["deployment_id"] == _deployment(stack, "lora-train/gpu")["id"]
        assert train["parameters"]["run_id"] == run.info.run_id
        # run_deployment linked it to the retrain run as a subflow
        parent_task = _get_json(f"{stack['api']}/task_runs/{train['parent_task_run_id']}")
        assert parent_task["flow_run_id"] == stack["flow_run_id"]
    assert run.data.metrics["train/world_size"] == 2
    assert "Completed" in stack["watch_output"]


def test_the_flow_run_is_named_and_tagged_like_its_mlflow_run(stack, mlflow_run):
    _, run = mlflow_run
    retrain = _flow_run(stack, stack["flow_run_id"])
    assert retrain["name"] == run.info.run_name  # <model>-<UTC date>-<short key>
    assert re.fullmatch(rf"{MODEL_NAME}-20\d{{6}}-[0-9a-f]{{8}}", run.info.run_name)
    assert {f"model:{MODEL_NAME}", "version:1", "promoted"} <= set(retrain["tags"])
    assert f"mlflow-run:{run.info.run_id}" in retrain["tags"]
    assert "production moved to it" in retrain["state"]["message"]
    train = run.data.tags["train.prefect_flow_run_id"]
    task_runs = _get_json(
        f"{stack['api']}/task_runs/filter", {"flow_runs": {"id": {"any_": [train]}}}
    )
    [gpu_task] = [t for t in task_runs if t["name"].startswith("train-lora")]
    assert "gpu" in gpu_task["tags"]
    in_process = _get_json(
        f"{stack['api']}/task_runs/filter", {"flow_runs": {"id": {"any_": [stack["flow_run_id"]]}}}
    )
    assert all("gpu" not in t["tags"] for t in in_process)  # only the gpu pool's task says gpu


def test_the_mlflow_run_holds_artifacts_and_metrics_from_both_workers(stack, mlflow_run):
    client, run = mlflow_run
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"data", "adapter", "train", "merged_model", "onnx", "config"} <= artifacts
    stored = list(stack["artifact_store"].rglob(f"{run_id}/artifacts/adapter/*.safetensors"))
    assert stored, "the adapter is not in the server's artifact store"
    metrics = run.data.metrics
    assert len(client.get_metric_history(run_id, "train/loss")) >= 2  # gpu worker
    assert metrics["time/train_lora"] > 0 and metrics["train/trainable_params"] > 0
    assert metrics["time/prepare_data"] > 0 and metrics["time/merge"] > 0
    assert 0 <= metrics["test/accuracy"] <= 1  # cpu worker
    assert run.data.params["train.deployment"] == "lora-train/gpu"
    # Each worker worked in its own folder: each gpu node downloaded the data and holds the
    # adapter (rank 0's node wrote it, the other fetched it), the cpu one downloaded it;
    # training ran only on the gpu workers, every other stage on the cpu one.
    cpu = stack["outputs"]["cpu"] / run_id
    adapter = (cpu / "adapter" / "adapter_model.safetensors").read_bytes()
    for node in ("gpu0", "gpu1"):
        gpu = stack["outputs"][node] / run_id
        assert (gpu / "data" / "tokenized").is_dir()
        assert (gpu / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    logs = {name: (stack["logs"] / f"worker-{name}.log").read_text() for name in WORKERS}
    for node in ("gpu0", "gpu1"):
        assert "Task run 'train-lora" in logs[node] and "Task run 'evaluate" not in logs[node]
    assert "Task run 'train-lora" not in logs["cpu"] and "Task run 'evaluate" in logs["cpu"]


def test_the_registry_alias_moved_to_the_new_version(stack, mlflow_run):
    client, run = mlflow_run
    production = client.get_model_version_by_alias(MODEL_NAME, "production")
    assert production.run_id == run.info.run_id and str(production.version) == "1"


def test_the_deployments_exist_with_the_nightly_schedule_and_the_gpu_limit(stack):
    nightly = _deployment(stack, "lora-retrain/nightly")
    crons = [(s["schedule"].get("cron"), s["active"]) for s in nightly["schedules"]]
    assert crons == [("0 2 * * *", True)]
    assert nightly["work_pool_name"] == "cpu"
    # and the server's scheduler turns it into upcoming runs (it breaks on SQLAlchemy 2.1)
    upcoming = _get_json(
        f"{stack['api']}/flow_runs/filter",
        {"deployments": {"id": {"any_": [nightly["id"]]}}, "limit": 10},
    )
    assert upcoming, (
        f"the scheduler created no runs for lora-retrain/nightly (SQLAlchemy "
        f"{importlib.metadata.version('sqlalchemy')}: Prefect 3.8 needs < 2.1, see pyproject)"
    )
    assert all(r["state"]["type"] == "SCHEDULED" for r in upcoming)
    assert {r["expected_start_time"][11:16] for r in upcoming} == {"02:00"}
    gpu = _deployment(stack, "lora-train/gpu")
    assert gpu["work_pool_name"] == "gpu"
    # no limit on the deployment (the nodes of one training run together); each gpu worker
    # runs one at a time (--limit 1), so a busy node's runs wait in the queue
    assert gpu["global_concurrency_limit"] is None
    assert _deployment(stack, "lora-promote/manual")["work_pool_name"] == "cpu"


def _rank_processes() -> list[int]:
    """The training ranks (`python -u -m tasks.train_adapter SPEC`), not torchrun's agents."""
    return [pid for pid in marked_processes(MARK) if b"-m\0tasks.train_adapter\0" in _cmdline(pid)]


def _training_processes() -> str:
    """The processes of the workers and trainings (flow runs, agents, ranks, watchdogs) with
    their parents, to show."""
    lines = []
    for pid in marked_processes(MARK):
        line = _cmdline(pid).replace(b"\0", b" ").decode(errors="replace")
        if "tasks." in line or "prefect" in line:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            lines.append(f"{pid} (parent {stat[1]}): {line[:200]}")
    return "\n".join(lines)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def on_the_servers(stack) -> list[str]:
    """Overrides for a run on the stack: its MLflow server and the cpu worker's folder."""
    return [
        "tracking.uri=null",  # the workers' MLFLOW_TRACKING_URI: the server
        "tracking.artifact_location=null",  # the server's proxied artifact store
        "tracking.experiment=production-topology",
        f"output_dir={stack['outputs']['cpu']}",
    ]


def _start_a_long_two_node_run(stack, make_tiny_config, name: str) -> str:
    """A retrain run whose training (two nodes, a rank each) goes on until stopped; returns
    its flow run id once both ranks train."""
    work = stack["work"] / name
    work.mkdir()
    config = make_tiny_config(
        work,
        [
            *on_the_servers(stack),
            "train.max_steps=100000",  # trains until stopped
            "train.epochs=1000",
            *TWO_NODES,
            f"train.distributed.rdzv_endpoint=127.0.0.1:{free_port()}",
        ],
    )
    path = work / "long.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    started = stack["run_adhoc"](path)
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", started.stdout).group(1)
    assert wait_until(lambda: len(_rank_processes()) == 2, 300), stack["procs"].logs()
    client = MlflowClient(tracking_uri=stack["mlflow_uri"])

    def training() -> bool:  # both ranks in the process group: rank 0 logged a loss
        runs = client.search_runs(
            [client.get_experiment_by_name("production-topology").experiment_id],
            filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'",
        )
        return bool(runs) and "train/loss" in runs[0].data.metrics

    assert wait_until(training, 300), stack["procs"].logs()
    return flow_run_id


SEARCH_SPACE = (
    'search.space={"lora.r": {"choices": [2, 4]}, '
    '"train.learning_rate": {"low": 0.001, "high": 0.05, "log": true}}'
)


def test_the_weekly_search_runs_parallel_trials_on_both_gpu_workers(
    stack, mlflow_run, make_tiny_config
):
    """`lora-retrain/weekly-search`: 4 trials, 2 at a time, as lora-train flow runs on the two
    gpu workers, all asking and telling one Optuna study in PostgreSQL; the winner's adapter
    is registered with the study's tags."""
    del mlflow_run  # after the first run
    import optuna

    work = stack["work"] / "search"
    work.mkdir()
    config = make_tiny_config(
        work,
        [
            *on_the_servers(stack),
            "output.keep=true",  # each worker's trial folders show where the trials ran
            "search.n_trials=4",
            "search.parallel=2",
            "search.pruner=none",
            "train.checkpoint_steps=0",
            "registry.model_name=tiny-searched",
            SEARCH_SPACE,
        ],
    )
    path = work / "search-config.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    run = stack["prefect"](
        "deployment", "run", "lora-retrain/weekly-search",
        "--params", json.dumps({"config_path": str(path)}),
        "--watch", "--watch-timeout", "600", timeout=660,
    )  # fmt: skip
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", run.stdout).group(1)
    assert _flow_run(stack, flow_run_id)["state"]["type"] == "COMPLETED", stack["procs"].logs()
    client = MlflowClient(tracking_uri=stack["mlflow_uri"], registry_uri=stack["mlflow_uri"])
    experiment = client.get_experiment_by_name("production-topology").experiment_id
    [parent] = client.search_runs(
        [experiment], filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'"
    )
    run_id = parent.info.run_id
    study = optuna.load_study(study_name=f"lora-search-{run_id}", storage=stack["optuna_uri"])
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    children = client.search_runs(
        [experiment], filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'"
    )
    assert {c.info.run_id for c in children} == {
        t.user_attrs["mlflow_run_id"] for t in study.trials
    }
    trial_runs = _get_json(
        f"{stack['api']}/flow_runs/filter",
        {"flow_runs": {"tags": {"all_": [f"search:{run_id}"]}}},
    )
    assert len(trial_runs) == 4 and {r["work_pool_name"] for r in trial_runs} == {"gpu"}
    assert all(r["parameters"]["trial"] for r in trial_runs)
    ran_on = {  # a trial leaves its working folder on the worker that trained it (output.keep)
        node for node in ("gpu0", "gpu1") for c in children
        if (stack["outputs"][node] / c.info.run_id).is_dir()
    }  # fmt: skip
    assert ran_on == {"gpu0", "gpu1"}
    version = client.get_model_version_by_alias("tiny-searched", "production")
    assert version.run_id == run_id
    assert version.tags["search.complete"] == "4"
    assert version.tags["search.study"] == f"lora-search-{run_id}"
    assert parent.data.tags["search.best_trial"] == str(best_trial(study).number)


class AlertReceiver:
    """A local HTTP endpoint standing in for the webhook: records every POSTed body."""

    def __init__(self):
        import http.server
        import threading

        received = self.received = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                received.append(self.rfile.read(int(self.headers["Content-Length"])).decode())
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alert"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _quick_on_data_trigger(api: str, config_path: Path) -> None:
    """The on-data trigger with test-sized windows (5 min in prefect.yaml: within 30 s, run
    5 s after the first event), and the deployment pointed at the tiny config."""
    from datetime import timedelta

    from prefect import get_client
    from prefect.client.schemas.actions import DeploymentUpdate
    from prefect.events.schemas.automations import AutomationCore
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("lora-retrain/on-data")
        client.update_deployment(
            deployment.id,
            DeploymentUpdate(parameters={"config_path": str(config_path), "overrides": []}),
        )
        [automation] = [
            a for a in client.read_automations()
            if any(getattr(x, "deployment_id", None) == deployment.id for x in a.actions)
        ]  # fmt: skip
        automation.trigger.within = timedelta(seconds=30)
        automation.actions[0].schedule_after = timedelta(seconds=5)
        fields = set(AutomationCore.model_fields) - {"owner_resource"}  # the update refuses it
        core = AutomationCore(**automation.model_dump(include=fields))
        client.update_automation(automation.id, core)


def _save_webhook_block(api: str, url: str) -> None:
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}):
        CustomWebhookNotificationBlock(
            name="test-receiver", url=url, json_data={"subject": "{{subject}}", "body": "{{body}}"}
        ).save("test-receiver", overwrite=True)


def test_new_rows_start_one_on_data_retrain_and_the_kept_candidate_alerts_the_webhook(
    stack, mlflow_run, make_tiny_config, small_csv, demo_frame
):
    """The watch against production v1: unchanged data emits nothing and starts nothing; 60
    new rows, watched twice in a row, emit their events twice and start exactly one
    lora-retrain/on-data run, tagged with its trigger; its candidate is kept (promote off),
    and the alert automation tells the webhook."""
    client, _ = mlflow_run
    work = stack["work"] / "watch"
    work.mkdir()
    source = work / "tickets.csv"
    shutil.copy(small_csv, source)
    config = make_tiny_config(
        work,
        [*on_the_servers(stack), f"data.path={source}", "registry.promote=false",
         "watch.permutations=200"],
    )  # fmt: skip
    path = work / "watch-config.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    receiver = AlertReceiver()
    try:
        _save_webhook_block(stack["api"], receiver.url)
        env = _clean_env(PREFECT_API_URL=stack["api"], MLFLOW_TRACKING_URI=stack["mlflow_uri"],
                         PREFECT_HOME=str(stack["work"] / "prefect-home"))  # fmt: skip

        def cli(*args: str) -> dict:
            done = subprocess.run(
                [sys.executable, "-m", "flows.cli", *args], env=env, cwd=ROOT,
                capture_output=True, text=True, timeout=600,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr[-4000:]
            return json.loads(done.stdout[done.stdout.index("{") :])

        cli("alerts", "--block", "custom-webhook/test-receiver")
        _quick_on_data_trigger(stack["api"], path)

        def on_data_runs() -> list[dict]:
            deployment = _deployment(stack, "lora-retrain/on-data")["id"]
            return _get_json(
                f"{stack['api']}/flow_runs/filter",
                {"flow_runs": {"deployment_id": {"any_": [deployment]}}},
            )

        unchanged = cli("watch", "--config", str(path))
        assert unchanged["events"] == [] and unchanged["new_rows"] == 0
        assert unchanged["version"] == "1"
        time.sleep(5)  # an event would have been evaluated by now (the trigger acts in ms)
        assert on_data_runs() == []  # no event, no run
        seen = set(pd_read(small_csv)["text"])
        new = demo_frame[~demo_frame["text"].isin(seen)].head(60)
        new.to_csv(source, mode="a", header=False, index=False)
        first = cli("watch", "--config", str(path))
        second = cli("watch", "--config", str(path))
        assert first["events"][0] == second["events"][0] == "lora.data.changed"
        assert first["new_rows"] == 60 and len(first["event_ids"]) == len(first["events"])
        assert wait_until(lambda: len(on_data_runs()) >= 1, 120), stack["procs"].logs()
        [retrain] = on_data_runs()

        def final() -> bool:
            return _flow_run(stack, retrain["id"])["state"]["type"] in ("COMPLETED", "FAILED")

        assert wait_until(final, 600), stack["procs"].logs()
        runs = on_data_runs()  # the run took longer than the 30 s window: any second run exists
        assert len(runs) == 1, [r["name"] for r in runs]  # two checks, four events, one run
        retrain = _flow_run(stack, retrain["id"])
        assert retrain["state"]["type"] == "COMPLETED", stack["procs"].logs()
        started_by = retrain["parameters"]["trigger"]["event"]  # whichever came in first
        assert started_by in first["events"] and f"trigger:{started_by}" in retrain["tags"]
        assert retrain["parameters"]["trigger"]["new_rows"] == "60"
        [mlflow_tag] = [t for t in retrain["tags"] if t.startswith("mlflow-run:")]
        run = client.get_run(mlflow_tag.removeprefix("mlflow-run:"))
        assert run.data.tags["trigger.event"] == started_by
        assert run.data.tags["trigger.event_id"] in first["event_ids"] + second["event_ids"]
        assert wait_until(lambda: any("lora.candidate.kept" in r for r in receiver.received), 120)
        [alert] = [r for r in receiver.received if "lora.candidate.kept" in r]
        assert "tiny-classifier" in alert
        assert not any("drift, not enough" in r for r in receiver.received)
    finally:
        receiver.close()


def pd_read(path):
    import pandas as pd

    return pd.read_csv(path)


def test_cancelling_the_retrain_run_ends_every_rank(stack, mlflow_run, make_tiny_config):
    """Cancel the retrain flow run through the API while both nodes' ranks train: the
    lora-train runs are cancelled with it and no rank process is left."""
    del mlflow_run  # after the first run: its ranks are gone
    flow_run_id = _start_a_long_two_node_run(stack, make_tiny_config, "cancel")
    urllib.request.urlopen(
        urllib.request.Request(
            f"{stack['api']}/flow_runs/{flow_run_id}/set_state",
            data=json.dumps({"state": {"type": "CANCELLING"}, "force": True}).encode(),
            headers={"Content-Type": "application/json"},
        )
    ).read()
    gone = wait_until(lambda: _rank_processes() == [], 180)
    assert gone, f"ranks left after the cancel:\n{_training_processes()}"
    [tag] = [t for t in _flow_run(stack, flow_run_id)["tags"] if t.startswith("mlflow-run:")]

    def node_states() -> set[str]:
        runs = _get_json(
            f"{stack['api']}/flow_runs/filter", {"flow_runs": {"tags": {"all_": [tag]}}}
        )
        return {r["state"]["type"] for r in runs if r["id"] != flow_run_id}

    assert wait_until(lambda: node_states() == {"CANCELLED"}, 120), node_states()
    assert wait_until(lambda: _flow_run(stack, flow_run_id)["state"]["type"] == "CANCELLED", 120)


def test_stopping_a_gpu_worker_ends_every_rank(stack, mlflow_run, make_tiny_config):
    """`docker stop` of one gpu worker while both nodes train: SIGTERM to its main process,
    SIGKILL after the 10 s grace if it still runs (Prefect's worker turns SIGTERM into SIGINT,
    a graceful stop that may wait for its flow run; once in CI it was still there after 180
    s). Its flow run may outlive it, its rank does not, and the other node's rank fails with
    it. Last in this module: the stack has one gpu worker less afterwards."""
    del mlflow_run
    flow_run_id = _start_a_long_two_node_run(stack, make_tiny_config, "stop-worker")
    [worker] = [p for name, p, _ in stack["procs"].started if name == "worker-gpu0"]
    before = _training_processes()
    worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(timeout=DOCKER_STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        worker.kill()
    gone = wait_until(lambda: _rank_processes() == [], 180)
    assert gone, f"before:\n{before}\nleft after the worker stopped:\n{_training_processes()}"
    assert wait_until(lambda: _flow_run(stack, flow_run_id)["state"]["type"] != "RUNNING", 300)
