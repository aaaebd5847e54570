"""`mlflow server` and `prefect server start` on loopback for tests, each in a process group
that dies with the test.

The MLflow server's job runners (huey consumers, started by MLflow 3 for GenAI jobs the
pipeline does not use) are switched off: they would outlive a stopped server.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tasks.common.processes import ProcessGroup, start_group


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerGroup(ProcessGroup):
    """A server's process group whose stop reaps the server as soon as it exits.

    ProcessGroup.stop waits until the group is empty, but an exited, not yet reaped leader (a
    zombie) still counts as a member, so it always waited the whole grace period and 5 s more.
    """

    def stop(self) -> int | None:
        try:
            os.killpg(self.pgid, signal.SIGTERM)
            self.process.wait(timeout=self.grace_s)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        return super().stop()  # whatever is left of the group: SIGTERM, grace, SIGKILL


def _start(command: list[str], grace_s: float, env: dict) -> ServerGroup:
    group = start_group(
        command, grace_s=grace_s, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return ServerGroup(group.process, group.watchdog, group.grace_s)


def mlflow_server(store: Path, port: int, env: dict | None = None) -> ServerGroup:
    """`mlflow server` on 127.0.0.1:port over store/mlflow.db and store/artifacts, ready."""
    venv_bin = str(Path(sys.executable).parent)
    env = {**(env or os.environ), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env["PATH"] = f"{venv_bin}{os.pathsep}{env.get('PATH', '')}"
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--workers", "1"]
    command += ["--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}"]
    command += ["--artifacts-destination", str(store / "artifacts")]
    group = _start(command, grace_s=30, env=env)
    return _wait_ready(group, "mlflow server", f"http://127.0.0.1:{port}/health")


def _wait_ready(group: ServerGroup, what: str, url: str) -> ServerGroup:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if group.process.poll() is not None:
            group.stop()
            raise RuntimeError(f"{what} exited with {group.process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return group
        except OSError:
            time.sleep(0.2)
    group.stop()
    raise RuntimeError(f"{what} did not come up in 120 s")


def prefect_server(home: Path, port: int, env: dict | None = None) -> ServerGroup:
    """`prefect server start` (API only) on 127.0.0.1:port, its database under home; ready.

    Point a client at it with PREFECT_API_URL=http://127.0.0.1:<port>/api."""
    env = {k: v for k, v in (env or os.environ).items() if k != "PREFECT_API_URL"}
    env |= {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--no-ui", "--no-services"]
    group = _start(command, grace_s=10, env=env)
    return _wait_ready(group, "prefect server", f"http://127.0.0.1:{port}/api/health")
