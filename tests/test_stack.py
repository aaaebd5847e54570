"""`make up` / `make down` (flows/stack.py): both servers come up, twice is harmless, flow runs
land on the stack's Prefect, and `down` leaves no process behind. Free ports, a throwaway store."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest
from test_processes import marked_processes, wait_until

from testkit.servers import free_port

ROOT = Path(__file__).resolve().parents[1]


def status_of(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except OSError:
        return 0


def stack_command(tmp_path: Path, env: dict):
    ports = {"prefect": free_port(), "mlflow": free_port()}
    options = ["--dir", str(tmp_path / ".stack"), "--prefect-port", str(ports["prefect"])]
    options += ["--mlflow-port", str(ports["mlflow"]), "--artifacts", str(tmp_path / "artifacts")]
    options += ["--backend-store-uri", f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"]

    def stack(command: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "flows.stack", command, *options],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )

    return stack, ports


def flow_run_names(api: str) -> list[str]:
    request = urllib.request.Request(
        f"{api}/flow_runs/filter", data=b"{}", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return [run["name"] for run in json.load(response)]


def run_a_flow(api_env: str, env: dict) -> None:
    """A flow with the environment `make demo` gets from `flows.stack env`."""
    name, _, value = api_env.partition("=")
    script = (
        "from prefect import flow\n"
        "@flow(name='stack-check', flow_run_name='stack-check-run')\n"
        "def check():\n    return 1\n"
        "check()\n"
    )
    subprocess.run(
        [sys.executable, "-c", script], env={**env, name: value}, check=True, timeout=300
    )


@pytest.mark.e2e  # two servers start: about a minute
def test_up_twice_runs_land_there_and_down_leaves_nothing(tmp_path):
    mark = uuid.uuid4().hex  # every process of the stack inherits it
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env["LORA_TEST_MARK"] = mark
    stack, ports = stack_command(tmp_path, env)
    try:
        first = stack("up")
        assert first.returncode == 0, first.stdout + first.stderr
        assert f"http://127.0.0.1:{ports['prefect']}" in first.stdout
        assert f"http://127.0.0.1:{ports['mlflow']}" in first.stdout
        assert status_of(f"http://127.0.0.1:{ports['prefect']}/api/health") == 200
        assert status_of(f"http://127.0.0.1:{ports['mlflow']}/health") == 200
        running = sorted(marked_processes(mark))
        assert running

        again = stack("up")
        assert again.returncode == 0, again.stdout + again.stderr
        assert again.stdout.count("already up") == 2
        assert sorted(marked_processes(mark)) == running  # nothing new started

        api = f"http://127.0.0.1:{ports['prefect']}/api"
        assert stack("env").stdout.strip() == f"PREFECT_API_URL={api}"
        run_a_flow(stack("env").stdout.strip(), env)
        assert "stack-check-run" in flow_run_names(api)  # kept by the server, not a temporary one
        assert stack("status").returncode == 0
    finally:
        down = stack("down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert wait_until(lambda: marked_processes(mark) == [])
    assert status_of(f"http://127.0.0.1:{ports['mlflow']}/health") == 0
    again = stack("down")
    assert again.returncode == 0 and again.stdout.count("not running") == 2
    assert stack("env").stdout == ""  # `make demo` falls back to Prefect's temporary server
    assert stack("status").returncode == 1


def test_up_refuses_a_taken_port_and_starts_nothing(tmp_path):
    mark = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env["LORA_TEST_MARK"] = mark
    stack, ports = stack_command(tmp_path, env)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", ports["mlflow"]))
        holder.listen()
        result = stack("up")
    assert result.returncode == 2
    assert f"http://127.0.0.1:{ports['mlflow']} is taken" in result.stderr
    assert marked_processes(mark) == []
    assert not list((tmp_path / ".stack").glob("*.json"))
