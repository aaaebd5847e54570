"""Run a registered model with `mlflow models serve` on a loopback port and query it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tasks.common.errors import PipelineError
from tasks.common.processes import start_group


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_models_serve(model_uri: str, tracking_uri: str, timeout_s: float = 180) -> Iterator[str]:
    """Start `mlflow models serve` (this environment, no new one) and yield its base URL.

    It runs in a process group of its own with a watchdog (tasks/common/processes.py), so it
    is stopped when the block ends and killed if this process dies first.
    """
    port = free_port()
    venv_bin = str(Path(sys.executable).parent)  # mlflow execs uvicorn from PATH
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    log = tempfile.TemporaryFile()  # a file, not a pipe: a chatty server never blocks on it
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri]
    command += ["--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]
    group = start_group(command, grace_s=30, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(group.process, log, url, timeout_s)
        yield url
    finally:
        group.stop()
        log.close()


def _wait_ready(server: subprocess.Popen, log, url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            log.seek(0)
            tail = log.read().decode(errors="replace")[-2000:]
            raise PipelineError(
                f"mlflow models serve exited with code {server.returncode}:\n{tail}"
            )
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise PipelineError(
        f"mlflow models serve did not answer /ping within {timeout_s:.0f} s at {url}"
    )


def invoke(url: str, texts: list[str], timeout_s: float = 60) -> list[dict]:
    """POST texts to a classifier's /invocations; one {label, score, probabilities} per text."""
    return invoke_records(url, [{"text": t} for t in texts], timeout_s)


def invoke_records(url: str, records: list[dict], timeout_s: float = 120) -> list[dict]:
    """POST table rows to /invocations; returns the model's answer rows."""
    body = json.dumps({"dataframe_records": records}).encode()
    request = urllib.request.Request(
        f"{url}/invocations", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.loads(response.read())["predictions"]
