"""An `mlflow server` on loopback for tests, in a process group that dies with the test.

Its job runners (huey consumers, started by MLflow 3 for GenAI jobs the pipeline does not use)
are switched off: they would outlive a stopped server.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tasks.common.processes import ProcessGroup, start_group


def mlflow_server(store: Path, port: int, env: dict | None = None) -> ProcessGroup:
    """`mlflow server` on 127.0.0.1:port over store/mlflow.db and store/artifacts, ready."""
    venv_bin = str(Path(sys.executable).parent)
    env = {**(env or os.environ), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env["PATH"] = f"{venv_bin}{os.pathsep}{env.get('PATH', '')}"
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--workers", "1"]
    command += ["--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}"]
    command += ["--artifacts-destination", str(store / "artifacts")]
    group = start_group(
        command, grace_s=30, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if group.process.poll() is not None:
            group.stop()
            raise RuntimeError(f"mlflow server exited with {group.process.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return group
        except OSError:
            time.sleep(0.5)
    group.stop()
    raise RuntimeError("mlflow server did not come up in 120 s")
