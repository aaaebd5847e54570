"""Child processes that never outlive the pipeline, even when it is killed with SIGKILL.

Each long-lived child (a served model, a server, a group of training ranks) runs in a process
group of its own, and a watchdog process (tasks/common/watchdog.py, a few lines of standard
library) waits on this process: when it dies, however it dies, the watchdog sends the group
SIGTERM, waits the grace period and sends SIGKILL. A child that ends normally is stopped the
same way by `ProcessGroup.stop()`, and its watchdog then exits too.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tasks.common.watchdog import end, start_time

WATCHDOG_MODULE = "tasks.common.watchdog"


def watch(targets: list[str], grace_s: float = 10.0, parent: int | None = None) -> subprocess.Popen:
    """A watchdog that ends `targets` when `parent` (default: this process) dies.

    A target is "g<pgid>" (a whole process group) or "p<pid>:<start time>" (one process).
    """
    command = [
        sys.executable,
        "-m",
        WATCHDOG_MODULE,
        str(parent or os.getpid()),
        str(grace_s),
        *targets,
    ]
    return subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a signal to our group must not take the watchdog with it
        close_fds=True,
    )


def process_target(pid: int) -> str:
    return f"p{pid}:{start_time(pid) or ''}"


@dataclass
class ProcessGroup:
    """A child started in its own process group, with its watchdog."""

    process: subprocess.Popen
    watchdog: subprocess.Popen
    grace_s: float

    @property
    def pgid(self) -> int:
        return self.process.pid

    def stop(self) -> int | None:
        """End the whole group (SIGTERM, grace, SIGKILL), then its watchdog; the exit code."""
        end([f"g{self.pgid}"], self.grace_s)
        self.process.poll()
        if self.process.returncode is None:
            self.process.wait(timeout=5)
        self.watchdog.terminate()
        self.watchdog.wait(timeout=5)
        return self.process.returncode


def start_group(command: list[str], grace_s: float = 10.0, **popen) -> ProcessGroup:
    """Start command in a new process group that dies with this process (see module doc)."""
    process = subprocess.Popen(command, start_new_session=True, **popen)
    return ProcessGroup(process, watch([f"g{process.pid}"], grace_s), grace_s)


@contextmanager
def exclusive(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive lock on lock_file (other processes wait; it ends with the process).

    For first-time set-ups that two processes must not run at once, such as creating the
    tables of a new SQLite database.
    """
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
