"""Child process groups die with the pipeline, even when it is SIGKILLed (watchdogs)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

from tasks.common.processes import start_group
from tasks.common.watchdog import alive, start_time

ROOT = Path(__file__).resolve().parents[1]


def marked_processes(mark: str) -> list[int]:
    """Pids of live processes whose environment carries LORA_TEST_MARK=mark."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if f"LORA_TEST_MARK={mark}".encode() in environ.split(b"\0") and state != "Z":
            found.append(int(entry.name))
    return found


def wait_until(condition, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def test_a_stopped_group_takes_every_process_and_its_watchdog_with_it():
    mark = uuid.uuid4().hex
    env = {**os.environ, "LORA_TEST_MARK": mark}
    # a parent that starts a grandchild: both in the group
    script = "import subprocess, time; subprocess.Popen(['sleep', '300']); time.sleep(300)"
    group = start_group([sys.executable, "-c", script], grace_s=2, env=env)
    assert wait_until(lambda: len(marked_processes(mark)) == 2)
    assert group.stop() is not None
    assert wait_until(lambda: marked_processes(mark) == [])
    assert group.watchdog.poll() is not None


def test_a_sigkilled_parent_leaves_no_child_behind(tmp_path):
    """The parent (as the pipeline would) starts a group and is killed with SIGKILL."""
    mark = uuid.uuid4().hex
    parent = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from tasks.common.processes import start_group
        group = start_group(["sleep", "300"], grace_s=2)
        print(group.pgid, group.watchdog.pid, flush=True)
        time.sleep(300)
        """
    )
    process = subprocess.Popen(
        [sys.executable, "-c", parent],
        env={**os.environ, "LORA_TEST_MARK": mark},
        stdout=subprocess.PIPE,
        text=True,
    )
    pgid, watchdog = map(int, process.stdout.readline().split())
    assert alive(f"g{pgid}") and start_time(watchdog) is not None
    assert len(marked_processes(mark)) == 3  # parent, the child, the watchdog
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=10)
    assert wait_until(lambda: marked_processes(mark) == [])
    assert not alive(f"g{pgid}")


def test_the_watchdog_ignores_a_reused_pid():
    pid = os.getpid()
    assert alive(f"p{pid}:{start_time(pid)}")
    assert not alive(f"p{pid}:1")  # same pid, another start time: not our process
    assert not alive("p999999999:")
