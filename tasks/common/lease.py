"""One process per pipeline run: a lease on the MLflow run, kept alive by a heartbeat.

The lease is a series of params `lease.0`, `lease.1`, ... each naming the process that claimed
the run (host/pid:start time). MLflow never changes a logged param, so logging `lease.N` is an
atomic claim: of two processes claiming the same N only one succeeds, and the highest N names
the holder. The holder refreshes the tag `lease.heartbeat` ("<holder> <unix time>") every
tracking.lease_ttl_s / 4 seconds and writes "<holder> released" when it is done.

A lease is alive until released and, on the holder's own host, while the holder's process
exists (so a killed run can be taken over at once there); from another host, while the
heartbeat is younger than the TTL.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass

from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tasks.common.errors import PipelineError
from tasks.common.watchdog import start_time

CLAIM_PARAM = "lease"
HEARTBEAT_TAG = "lease.heartbeat"
RELEASED = "released"


class RunInProgress(PipelineError):
    """Another process holds the lease of a run with this data and config."""


@dataclass(frozen=True)
class Holder:
    """A process, by host, pid and start time (a pid alone can be reused)."""

    host: str
    pid: int
    started: str

    @classmethod
    def me(cls) -> Holder:
        return cls(socket.gethostname(), os.getpid(), start_time(os.getpid()) or "")

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        host, _, rest = text.rpartition("/")
        pid, _, started = rest.partition(":")
        return cls(host, int(pid), started) if host and pid.isdigit() else None

    def __str__(self) -> str:
        return f"{self.host}/{self.pid}:{self.started}"

    def alive_here(self) -> bool:
        return start_time(self.pid) == self.started


def claims(run: Run) -> dict[int, str]:
    """The run's lease claims: number -> claimant."""
    prefix = f"{CLAIM_PARAM}."
    return {
        int(key[len(prefix) :]): value
        for key, value in run.data.params.items()
        if key.startswith(prefix) and key[len(prefix) :].isdigit()
    }


def holder_of(run: Run) -> Holder | None:
    taken = claims(run)
    return Holder.parse(taken[max(taken)]) if taken else None


def lease_alive(run: Run, ttl_s: float, now: float | None = None) -> bool:
    """Whether a live process holds run's lease (see the module doc)."""
    holder = holder_of(run)
    if holder is None or run.info.status == "FINISHED":
        return False
    beat_holder, _, beat = run.data.tags.get(HEARTBEAT_TAG, "").partition(" ")
    ours = beat_holder == str(holder)
    if ours and beat == RELEASED:
        return False
    if holder.host == socket.gethostname():
        return holder.alive_here()
    try:
        return ours and (now or time.time()) - float(beat) < ttl_s
    except ValueError:
        return False


def describe(run: Run) -> str:
    """Who holds run's lease and when it last beat, for messages."""
    _, _, beat = run.data.tags.get(HEARTBEAT_TAG, "").partition(" ")
    try:
        age = f"heartbeat {time.time() - float(beat):.0f} s ago"
    except ValueError:
        age = "no heartbeat yet"
    return f"run {run.info.run_id} (process {holder_of(run)}, {age})"


class Lease:
    """This process's lease on one run: claimed once, then kept alive by a daemon thread."""

    def __init__(self, client: MlflowClient, run_id: str, ttl_s: float):
        self.client, self.run_id, self.ttl_s = client, run_id, ttl_s
        self.holder = Holder.me()
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def claim(self, number: int) -> bool:
        """Log lease.<number> = us (atomic); False when another process got that number."""
        try:
            self.client.log_param(self.run_id, f"{CLAIM_PARAM}.{number}", str(self.holder))
        except MlflowException as exc:
            if exc.error_code == "INVALID_PARAMETER_VALUE":
                return False
            raise
        self._beat(f"{time.time():.3f}")
        self._thread = threading.Thread(target=self._keep_alive, daemon=True, name="lease")
        self._thread.start()
        return True

    def _beat(self, value: str) -> None:
        self.client.set_tag(self.run_id, HEARTBEAT_TAG, f"{self.holder} {value}")

    def _keep_alive(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                if holder_of(self.client.get_run(self.run_id)) != self.holder:
                    self.lost.set()  # taken over after our heartbeat stalled
                    return
                self._beat(f"{time.time():.3f}")
            except Exception:  # noqa: BLE001 - a tracking outage: beat again next time
                continue

    def check(self) -> None:
        """Raise when another process took this run over."""
        if self.lost.is_set():
            raise RunInProgress(
                f"run {self.run_id} was taken over by another process after this one's "
                f"heartbeat stopped for over tracking.lease_ttl_s={self.ttl_s:.0f} s; this "
                f"process stops so that the two do not write the same run"
            )

    def release(self) -> None:
        """Stop the heartbeat and mark the lease released (the run may be claimed again)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if not self.lost.is_set():
            try:
                self._beat(RELEASED)
            except Exception:  # noqa: BLE001 - unreachable store: the TTL frees the lease
                pass
