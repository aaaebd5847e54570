"""The pipeline's CLI as separate processes for tests, without paying its imports every time.

`python -m flows.cli` spends most of a short run importing torch, transformers, Prefect and
MLflow (15-20 s of CPU). `CliLauncher` starts one helper process that imports them once and
then forks one child per CLI run: the child applies the run's environment, working folder and
output files, and calls `flows.cli.main(argv)` exactly as `python -m flows.cli argv` would
(`sys.exit` of its result, a traceback and exit code 1 for an uncaught exception, the normal
interpreter exit with its atexit handlers). Each child is a real process of its own: it can be
killed (SIGKILL included), its children (servers, watchdogs) are started and watched as in any
run, and its exit status is that of a plain CLI process (-9 after SIGKILL).

The helper forks with no Python thread but its main one (it checks); the native thread pools
that numpy and pyarrow start at import (OpenBLAS, jemalloc) have fork handlers, as
multiprocessing's fork and torch's DataLoader workers rely on. Settings that
a library reads at import time cannot differ between runs: a run's environment may differ from
the helper's only in the variables of RUN_ENV and RUN_ENV_PREFIXES, which are read when used
(Prefect's settings are re-read in the child). Use a plain subprocess for a test whose subject
is the environment.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN_ENV = frozenset(
    {
        "LORA_TEST_MARK",  # tests/test_processes.marked_processes
        "LORA_RETRAIN_KILL_AT",  # tasks/common/faults.py, read at each fault point
        "PREFECT_HOME",
        "PREFECT_API_URL",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS",
        "PATH",
        "PYTEST_CURRENT_TEST",  # pytest's, per test
        "_MLFLOW_TELEMETRY_SESSION_ID",  # set by MLflow in the test process once it is used
    }
)
# Read when used too: MLflow's tracking credentials (per request; the CLI moves them out of a
# tracking URI) and accelerate's settings (when a Trainer starts), which in-process tests of
# the same session set in os.environ.
RUN_ENV_PREFIXES = ("MLFLOW_TRACKING_", "ACCELERATE_")
# What the CLI imports, less onnxruntime: its thread (started at import) is gone in a forked
# child, whose exit then waits on it forever (a static destructor). The child imports it.
PRELOADED = (
    "torch",
    "transformers",
    "prefect",
    "prefect.server.api.server",
    "mlflow",
    "mlflow.pyfunc",
    "sklearn.metrics",
    "pandas",
    "datasets",
    "matplotlib.pyplot",
    "optimum.exporters.onnx",
    "onnx",
    "accelerate",
    "tasks.common.errors",
)
FORK_UNSAFE = ("onnxruntime",)


class CliProcess:
    """One CLI run in a forked child; the parts of subprocess.Popen the tests use."""

    def __init__(self, launcher: CliLauncher, pid: int, out: Path, err: Path):
        self.launcher, self.pid, self._out, self._err = launcher, pid, out, err
        self.returncode: int | None = None
        self.args = ["flows.cli"]

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.launcher._wait(self.pid, block=False)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.returncode = self.launcher._wait(self.pid, block=True, timeout=timeout)
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        return self.output()

    def output(self) -> tuple[str, str]:
        return self._out.read_text(errors="replace"), self._err.read_text(errors="replace")


class CliLauncher:
    """A helper process with the CLI's modules imported, forking a child per CLI run."""

    def __init__(self, env: dict[str, str] | None = None):
        self.env = {k: v for k, v in (env or os.environ).items() if k != "LORA_TEST_MARK"}
        self.folder = Path(tempfile.mkdtemp(prefix="lora-cli-"))
        self.count = 0
        self.lock = threading.Lock()
        self.helper = subprocess.Popen(
            [sys.executable, "-m", "testkit.cli"],
            cwd=ROOT,
            env=self.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(self.folder / "helper.log", "wb"),  # noqa: SIM115 - the child's now
        )
        reply = self._read(timeout=600)
        if reply.get("ready") is not True:
            raise RuntimeError(f"the CLI helper did not start: {reply}; see {self.folder}")

    def _read(self, timeout: float | None) -> dict:
        ready, _, _ = select.select([self.helper.stdout], [], [], timeout)
        if not ready:
            return {"timeout": True}
        line = self.helper.stdout.readline()
        if not line:
            log = (self.folder / "helper.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the CLI helper exited: {log}")
        return json.loads(line)

    def _ask(self, request: dict, timeout: float | None = None) -> dict:
        self.helper.stdin.write(json.dumps(request).encode() + b"\n")
        self.helper.stdin.flush()
        return self._read(timeout)

    def _wait(self, pid: int, block: bool, timeout: float | None = None) -> int | None:
        with self.lock:
            reply = self._ask({"op": "wait", "pid": pid, "block": block}, timeout)
            if reply.get("timeout"):  # as subprocess.run does: kill it, reap it, raise
                os.kill(pid, signal.SIGKILL)
                self._read(timeout=60)
                raise subprocess.TimeoutExpired(["flows.cli", str(pid)], timeout)
        return reply["returncode"]

    def start(
        self, args: list[str], env: dict[str, str] | None = None, new_session: bool = False
    ) -> CliProcess:
        """`python -m flows.cli *args` in ROOT with `env` (default: this process's)."""
        env = dict(os.environ if env is None else env)
        differ = {k for k in self.env.keys() | env.keys() if self.env.get(k) != env.get(k)}
        differ = {k for k in differ - RUN_ENV if not k.startswith(RUN_ENV_PREFIXES)}
        if differ:
            raise ValueError(f"read at import time, cannot differ per run: {differ}")
        with self.lock:
            self.count += 1
            out, err = (self.folder / f"{self.count}.{name}" for name in ("out", "err"))
            request = {"op": "start", "argv": list(args), "env": env, "cwd": str(ROOT)}
            request |= {"stdout": str(out), "stderr": str(err), "new_session": new_session}
            pid = self._ask(request, timeout=60)["pid"]
        return CliProcess(self, pid, out, err)

    def run(
        self, args: list[str], env: dict[str, str] | None = None, timeout: float | None = None
    ) -> subprocess.CompletedProcess:
        """Like subprocess.run(capture_output=True, text=True) of the CLI."""
        process = self.start(args, env)
        out, err = process.communicate(timeout)
        return subprocess.CompletedProcess(["flows.cli", *args], process.returncode, out, err)

    def close(self) -> None:
        self.helper.stdin.close()
        self.helper.wait(timeout=60)
        self.helper.stdout.close()


def _serve() -> dict:
    """The helper's loop (in the helper); returns the request in a forked child only."""
    import gc
    import importlib

    for module in PRELOADED:
        importlib.import_module(module)
    unsafe = [name for name in FORK_UNSAFE if name in sys.modules]
    if threading.active_count() != 1 or unsafe:  # a Python thread could hold a lock
        _reply({"ready": False, "threads": threading.active_count(), "unsafe": unsafe})
        sys.exit(1)
    gc.freeze()  # the imported objects: no child's collections walk (and copy) them
    _reply({"ready": True})
    for line in _lines(0):
        request = json.loads(line)
        if request["op"] == "start":
            pid = os.fork()
            if pid == 0:
                return request
            _reply({"pid": pid})
        else:
            pid, status = os.waitpid(request["pid"], 0 if request["block"] else os.WNOHANG)
            _reply({"returncode": os.waitstatus_to_exitcode(status) if pid else None})
    sys.exit(0)


def _lines(fd: int):
    """Lines read from fd with os.read (no buffered Python stream a child would inherit)."""
    buffer = b""
    while chunk := os.read(fd, 65536):
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            yield line


def _reply(message: dict) -> None:
    os.write(1, json.dumps(message).encode() + b"\n")


def _become_the_run(request: dict) -> list[str]:
    """In the child: the run's session, files, folder and environment; its argv."""
    if request["new_session"]:
        os.setsid()
    stdin = os.open(os.devnull, os.O_RDONLY)
    out = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    err = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    for fd, target in ((stdin, 0), (out, 1), (err, 2)):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    from prefect.context import refresh_global_settings_context

    refresh_global_settings_context()  # Prefect read its settings at import
    sys.argv = [str(ROOT / "flows" / "cli.py"), *request["argv"]]
    return request["argv"]


if __name__ == "__main__":
    argv = _become_the_run(_serve())
    from flows.cli import main

    sys.exit(main(argv))
