"""Errors the pipeline raises for bad input, and which failures are worth a retry.

A PipelineError is a problem the user can fix: the CLI prints its message (`error: ...`) and
exits 2, and it is never retried. Of everything else only transient faults (a network or
tracking-server hiccup, a locked database) are retried; a bug or a wrong value would only
fail again.
"""

from __future__ import annotations

import errno
import sqlite3


class PipelineError(Exception):
    """A problem the user can fix; the message says what, where and how."""


class ConfigError(PipelineError, ValueError):
    """The config file or an override is invalid."""


class DataError(PipelineError, ValueError):
    """The dataset cannot be used as given."""


class ModelError(PipelineError, ValueError):
    """The base model or adapter cannot be loaded."""


class TrainingError(PipelineError):
    """Training cannot go on (e.g. the loss became NaN or infinite)."""


class GateFailed(PipelineError):
    """A quality gate stopped the run; its record is attached."""

    def __init__(self, gate):
        self.gate = gate
        super().__init__(gate.describe())


TRANSIENT_ERRNOS = {
    errno.ECONNREFUSED,
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.ETIMEDOUT,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.EPIPE,
    errno.EAGAIN,
}
TRANSIENT_TEXT = (
    "Max retries exceeded",
    "Connection refused",
    "Connection reset",
    "temporarily unavailable",
    "TEMPORARILY_UNAVAILABLE",
    "database is locked",
    "Read timed out",
    "502 Bad Gateway",
    "503 Service Unavailable",
    "504 Gateway Timeout",
)
TRANSIENT_TYPES = ("ConnectError", "ConnectTimeout", "ReadTimeout", "RemoteProtocolError")


def is_transient(exc: BaseException) -> bool:
    """A network, tracking-server or database-lock fault (anywhere in the exception's chain)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, PipelineError):
            return False
        if isinstance(exc, ConnectionError | TimeoutError):
            return True
        if isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS:
            return True
        if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
            return True
        if type(exc).__name__ in TRANSIENT_TYPES or any(t in str(exc) for t in TRANSIENT_TEXT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect retry condition: retry transient faults only (see is_transient)."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - the task's own failure, examined here
        return is_transient(exc)
    return False
