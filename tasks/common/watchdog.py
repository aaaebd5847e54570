"""Watchdog: `python -m tasks.common.watchdog PARENT GRACE TARGET...` (see processes.py).

Waits until process PARENT is gone, then ends each TARGET: "g<pgid>" (SIGTERM to the process
group, GRACE seconds, then SIGKILL) or "p<pid>:<start time>" (the same for one process, if it
is still the process that started then). Exits early once every target has ended by itself.
Standard library only: it starts in a few milliseconds.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks (/proc), to tell it from a later reuse of its pid."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def alive(target: str) -> bool:
    """Whether the target still has a process: any member of the group, or that very process."""
    kind, rest = target[0], target[1:]
    try:
        if kind == "g":
            os.killpg(int(rest), 0)
            return True
        pid, _, started = rest.partition(":")
        now = start_time(int(pid))
        return now is not None and (not started or now == started)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return kind == "g"


def _signal(target: str, sig: int) -> None:
    try:
        if target[0] == "g":
            os.killpg(int(target[1:]), sig)
        else:
            os.kill(int(target[1:].partition(":")[0]), sig)
    except (ProcessLookupError, PermissionError, ValueError):
        pass


def end(targets: list[str], grace_s: float) -> None:
    """SIGTERM to every live target, up to grace_s for them to go, then SIGKILL."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        alive_now = [t for t in targets if alive(t)]
        for target in alive_now:
            _signal(target, sig)
        deadline = time.monotonic() + wait_s
        while alive_now and time.monotonic() < deadline:
            time.sleep(0.05)
            alive_now = [t for t in alive_now if alive(t)]
        if not alive_now:
            return


def _parent_gone(parent: int, pidfd: int | None, timeout_s: float) -> bool:
    if pidfd is not None:
        readable, _, _ = select.select([pidfd], [], [], timeout_s)
        return bool(readable)
    time.sleep(timeout_s)
    try:
        os.kill(parent, 0)
    except ProcessLookupError:
        return True
    return False


def main(argv: list[str]) -> int:
    parent, grace_s, targets = int(argv[1]), float(argv[2]), argv[3:]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # only the parent's death (or stop) ends us
    try:
        pidfd = os.pidfd_open(parent)
    except ProcessLookupError:
        end(targets, grace_s)  # the parent died before we started
        return 0
    except (AttributeError, OSError):
        pidfd = None  # no pidfd (old kernel): poll
    while any(alive(t) for t in targets):
        if _parent_gone(parent, pidfd, 0.5):
            end(targets, grace_s)
            return 0
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
