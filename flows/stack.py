"""`make up` / `make down`: a local Prefect server and MLflow server as native processes.

    python -m flows.stack up|down|status|env [--dir .stack] [--prefect-port 4200]
        [--mlflow-port 5000] [--backend-store-uri sqlite:///mlruns/mlflow.db]
        [--artifacts mlruns/artifacts] [--timeout 300]

`up` starts `prefect server start` (PREFECT_HOME in <dir>/prefect) and `mlflow server` over the
embedded default's store (the SQLite file and artifact folder `make demo` writes, so its runs
show there), both on 127.0.0.1, each detached in a process group of its own: unlike the
children of tasks/common/processes.py they outlive this command. Their state (pgid, start
time, URLs) and logs go to <dir>. `up` waits until both answer HTTP (Prefect /api/health,
MLflow /health) and prints the URLs; a stack already up is left as it is. `down` ends each
group (SIGTERM, grace, SIGKILL: tasks/common/watchdog.end); a stack already down is fine.
`env` prints `PREFECT_API_URL=...` while the stack's Prefect answers (nothing when it is down
or the caller set PREFECT_API_URL), for `make demo`: `env $(python -m flows.stack env) ...`.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from tasks.common.processes import exclusive
from tasks.common.watchdog import alive, end, start_time

HOST = "127.0.0.1"
GRACE_S = 15.0


@dataclass(frozen=True)
class Service:
    name: str
    command: list[str]
    env: dict[str, str]
    url: str  # what people open
    health: str  # answers 200 once the server is ready
    api: str = ""  # the Prefect API (PREFECT_API_URL)


def sqlite_absolute(uri: str) -> str:
    """A relative `sqlite:///path` made absolute (its folder created); other URIs unchanged."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return uri
    path = Path(uri.removeprefix(prefix)).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"{prefix}{path}"


def _base_env() -> dict[str, str]:
    venv_bin = str(Path(sys.executable).parent)  # the servers find their helpers (gunicorn...)
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_PROFILE")}
    env["PATH"] = f"{venv_bin}{os.pathsep}{env.get('PATH', '')}"
    return env


def prefect_service(folder: Path, port: int) -> Service:
    api = f"http://{HOST}:{port}/api"
    env = {
        **_base_env(),
        "PREFECT_HOME": str((folder / "prefect").resolve()),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_API_HOST": HOST,
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_UI_API_URL": api,
    }
    command = [sys.executable, "-m", "prefect", "server", "start"]
    command += ["--host", HOST, "--port", str(port), "--analytics-off"]
    return Service("prefect", command, env, f"http://{HOST}:{port}", f"{api}/health", api)


def mlflow_service(store_uri: str, artifacts: Path, port: int) -> Service:
    # its GenAI job runners (huey consumers) are not needed: the pipeline logs no GenAI jobs
    env = {**_base_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    command = [sys.executable, "-m", "mlflow", "server", "--host", HOST, "--port", str(port)]
    command += ["--workers", "1", "--backend-store-uri", sqlite_absolute(store_uri)]
    command += ["--artifacts-destination", str(artifacts.resolve())]
    url = f"http://{HOST}:{port}"
    return Service("mlflow", command, env, url, f"{url}/health")


def services(args) -> list[Service]:
    return [
        prefect_service(args.dir, args.prefect_port),
        mlflow_service(args.backend_store_uri, args.artifacts, args.mlflow_port),
    ]


def answers(url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status == 200
    except OSError:
        return False


def port_taken(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((HOST, port))
        except OSError:
            return True
    return False


def state_file(folder: Path, name: str) -> Path:
    return folder / f"{name}.json"


def read_state(folder: Path, name: str) -> dict | None:
    try:
        return json.loads(state_file(folder, name).read_text())
    except (OSError, ValueError):
        return None


def running(state: dict | None) -> bool:
    """Whether the recorded process group still has a process (and is still ours)."""
    if not state or not alive(f"g{state['pgid']}"):
        return False
    leader = start_time(state["pgid"])
    return leader is None or leader == state["start"]  # no leader: the group lives on


def launch(service: Service, folder: Path) -> dict:
    """Start the service detached in a new process group; record and return its state."""
    log = folder / f"{service.name}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            service.command,
            env=service.env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group and session: it outlives us
            close_fds=True,
        )
    state = {
        "pgid": process.pid,
        "start": start_time(process.pid),
        "url": service.url,
        "health": service.health,
        "api": service.api,
        "log": str(log),
    }
    state_file(folder, service.name).write_text(json.dumps(state, indent=2))
    return state


def wait_ready(states: dict[str, dict], timeout_s: float) -> str | None:
    """None once every service answers its health URL, else what went wrong."""
    deadline = time.monotonic() + timeout_s
    waiting = dict(states)
    while waiting:
        for name, state in list(waiting.items()):
            if answers(state["health"]):
                del waiting[name]
            elif not running(state):
                return f"{name} exited during start-up; its log: {state['log']}"
        if waiting and time.monotonic() > deadline:
            logs = ", ".join(state["log"] for state in waiting.values())
            return f"{', '.join(waiting)} did not answer in {timeout_s:.0f} s; see {logs}"
        time.sleep(0.5)
    return None


def store_lock(uri: str):
    """The pipeline's first-use lock of a SQLite store (tasks/common/tracking.first_use_lock):
    held while `mlflow server` creates a new database's tables, so a demo does not race it."""
    uri = sqlite_absolute(uri)
    if uri.startswith("sqlite:///"):
        return exclusive(Path(uri.removeprefix("sqlite:///") + ".lock"))
    return nullcontext()


def stop(folder: Path, name: str) -> bool:
    """End the service's process group if it runs and forget it; whether it was running."""
    state = read_state(folder, name)
    was_running = running(state)
    if was_running:
        end([f"g{state['pgid']}"], GRACE_S)
    state_file(folder, name).unlink(missing_ok=True)
    return was_running


def start_missing(args, wanted: list[Service]) -> tuple[dict[str, dict], list[str]] | None:
    """Start the services that are not running; their states and the new ones' names, or
    None (nothing started) when a port they need is taken."""
    states = {s.name: read_state(args.dir, s.name) for s in wanted}
    new = [s for s in wanted if not running(states[s.name])]
    taken = [s.url for s in new if port_taken(int(s.url.rsplit(":", 1)[1]))]
    for url in taken:
        print(
            f"error: {url} is taken by another process (`make ui`?); choose other ports: "
            "make up PREFECT_PORT=... MLFLOW_PORT=...",
            file=sys.stderr,
        )
    if taken:
        return None
    for service in wanted:
        if service in new:
            states[service.name] = launch(service, args.dir)
        else:
            print(f"{service.name}: already up (process group {states[service.name]['pgid']})")
    return states, [s.name for s in new]


def up(args) -> int:
    args.dir.mkdir(parents=True, exist_ok=True)
    with exclusive(args.dir / "stack.lock"):  # two `make up` at once start one stack
        started = start_missing(args, services(args))
        if started is None:
            return 2
        states, new = started
        with store_lock(args.backend_store_uri) if "mlflow" in new else nullcontext():
            problem = wait_ready(states, args.timeout)
        if problem:
            for name in new:
                stop(args.dir, name)
            print(f"error: {problem}", file=sys.stderr)
            return 1
    print(f"Prefect UI  {states['prefect']['url']}   (API {states['prefect']['api']})")
    print(f"MLflow UI   {states['mlflow']['url']}/#/?workflowType=machine_learning")
    print(f"logs in {args.dir}/; `make demo` now runs on this Prefect; `make down` stops both")
    return 0


def down(args) -> int:
    with exclusive(args.dir / "stack.lock"):
        for name in ("prefect", "mlflow"):
            print(f"{name}: {'stopped' if stop(args.dir, name) else 'not running'}")
    return 0


def status(args) -> int:
    """Exit 0 when both services answer, 1 otherwise."""
    healthy = 0
    for name in ("prefect", "mlflow"):
        state = read_state(args.dir, name)
        if not running(state):
            print(f"{name}: down")
        elif answers(state["health"]):
            healthy += 1
            print(f"{name}: up at {state['url']} (process group {state['pgid']})")
        else:
            print(f"{name}: starting or not answering (process group {state['pgid']})")
    return 0 if healthy == 2 else 1


def env(args) -> int:
    """`PREFECT_API_URL=...` for `make demo` while the stack's Prefect answers."""
    state = read_state(args.dir, "prefect")
    if "PREFECT_API_URL" not in os.environ and running(state) and answers(state["health"]):
        print(f"PREFECT_API_URL={state['api']}")
    return 0


COMMANDS = {"up": up, "down": down, "status": status, "env": env}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flows.stack", description=__doc__.split("\n")[0])
    p.add_argument("command", choices=sorted(COMMANDS))
    p.add_argument("--dir", type=Path, default=Path(".stack"), help="state, logs, PREFECT_HOME")
    p.add_argument("--prefect-port", type=int, default=4200)
    p.add_argument("--mlflow-port", type=int, default=5000)
    p.add_argument("--backend-store-uri", default="sqlite:///mlruns/mlflow.db")
    p.add_argument("--artifacts", type=Path, default=Path("mlruns/artifacts"))
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for `up`")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
