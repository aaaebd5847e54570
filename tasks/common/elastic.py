"""torchrun, run in this process, with its outcome written where the train stage reads it.

`python -m tasks.common.elastic OUTCOME.json -- <torchrun arguments>` is torchrun itself
(torch.distributed.run: the elastic agent, c10d rendezvous, restarts); it adds one thing: how
the group ended, as JSON, instead of a traceback for the stage to parse:

- {"ok": true}
- {"ok": false, "cause": "rendezvous", "joined": K, "nnodes": N, "seconds": T}
- {"ok": false, "cause": "rank", "rank": R, "local_rank": L, "host": H, "exitcode": E,
  "signal": "SIGKILL" or null, "message": "<ErrorClass>: <text>" of the rank's own error, if
  it recorded one, "output": the last lines the rank wrote to stderr (where torchrun redirected
  them to a file: every local rank but 0)}

K (nodes that joined) is the most participants this node saw in the rendezvous, polled while
it waits. The rendezvous backend is torch's c10d, registered under another name only so that
this process keeps a handle on it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import (
    ChildFailedError,
    ErrorHandler,
    ProcessFailure,
)
from torch.distributed.elastic.multiprocessing.errors import record as torch_record
from torch.distributed.elastic.rendezvous import registry
from torch.distributed.elastic.rendezvous.api import RendezvousTimeoutError
from torch.distributed.run import parse_args, run

BACKEND = "c10d-observed"


class AtomicErrorHandler(ErrorHandler):
    """torch's error handler, writing a rank's error file whole or not at all (to a partial
    file, then renamed). When one rank dies the agent SIGTERMs the others and reads every
    failed rank's error file: one caught mid-write was empty, the agent's JSON parse failed
    and torchrun exited 1 instead of restarting the group."""

    partial: str | None = None

    def _get_error_file_path(self) -> str | None:
        return self.partial or super()._get_error_file_path()

    def record_exception(self, e: BaseException) -> None:
        final = super()._get_error_file_path()
        if final is None:
            super().record_exception(e)
            return
        self.partial = f"{final}.partial"
        try:
            super().record_exception(e)
        finally:
            self.partial = None
        os.replace(f"{final}.partial", final)


def record(fn):
    """torch's @record (a rank's exception reaches the agent as its message), atomically."""
    return torch_record(fn, error_handler=AtomicErrorHandler())


class Rendezvous:
    """The c10d handlers this process created, and the most nodes any of them saw joined."""

    def __init__(self):
        self.handlers = []
        self.joined = 1  # this node

    def create(self, params):
        handler = registry._create_c10d_handler(params)
        handler.get_backend = lambda: BACKEND  # the name it was asked for (torch checks it)
        self.handlers.append(handler)
        return handler

    def watch(self, every_s: float = 0.5) -> None:
        """Poll the handlers' rendezvous state (a daemon thread) until the process ends."""

        def poll():
            while True:
                for handler in list(self.handlers):
                    state = getattr(getattr(handler, "_state_holder", None), "state", None)
                    if state is not None:
                        self.joined = max(self.joined, len(state.participants))
                time.sleep(every_s)

        threading.Thread(target=poll, daemon=True).start()


# A rank's own message when it only saw another rank go away (gloo, NCCL): a consequence.
PEER_LOST = re.compile(
    r"Connection (reset|closed) by peer|Broken pipe|Watchdog caught collective"
    r"|NCCL communicator was aborted|remote process exited|ProcessGroupGloo.*Timed out",
    re.IGNORECASE,
)


def _message(failure: ProcessFailure) -> str:
    """The rank's own message, from its error file; empty where it left none (torch then
    makes one up, "Signal 9 (SIGKILL) received by PID ...", which says no more than the
    outcome's signal or exit code)."""
    if isinstance(failure.message, dict):
        return str(failure.message.get("message", ""))
    own = isinstance(failure.message, str) and os.path.isfile(failure.error_file)
    return failure.message if own else ""


def root_cause(failures: dict[int, ProcessFailure]) -> int:
    """The rank whose failure caused the others'. torch's `get_first_failure` takes the
    earliest timestamp, but a rank killed by a signal has no error file and is stamped when
    the agent notices it (whole seconds), after a peer that saw the broken connection wrote
    its own: a SIGKILLed rank 1 was reported as rank 0's "Connection reset by peer". So: a
    rank killed by a signal other than the agent's SIGTERM first, then a rank's own error,
    then one that only lost a peer, then ranks the agent stopped; earliest, then lowest rank,
    within each."""

    def order(rank: int) -> tuple[int, int, int]:
        failure = failures[rank]
        if failure.exitcode < 0:
            kind = 3 if failure.exitcode == -signal.SIGTERM else 0
        else:
            kind = 2 if PEER_LOST.search(_message(failure)) else 1
        return kind, failure.timestamp, rank

    return min(failures, key=order)


OUTPUT_LINES = 12  # of a failed rank's stderr, in its outcome
OUTPUT_CHARS = 2000


def last_output(log_dir: str | None, local_rank: int) -> str:
    """The end of the local rank's stderr in the group's last attempt (torchrun writes
    <log_dir>/<run>/attempt_<k>/<local rank>/stderr.log); empty where its stderr was not
    redirected (local rank 0: the console has it). A rank killed by a signal leaves no error
    file, so the file is found from the folder, not from the failure."""
    files = list(Path(log_dir).glob(f"*/attempt_*/{local_rank}/stderr.log")) if log_dir else []
    if not files:
        return ""
    stderr = max(files, key=lambda f: int(f.parent.parent.name.removeprefix("attempt_")))
    try:
        with open(stderr, "rb") as file:
            file.seek(max(0, file.seek(0, os.SEEK_END) - 4 * OUTPUT_CHARS))
            text = file.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    lines = [line for line in text.splitlines() if line.strip()][-OUTPUT_LINES:]
    return "\n".join(lines)[-OUTPUT_CHARS:]


def rank_outcome(exc: ChildFailedError, log_dir: str | None = None) -> dict:
    """The failed rank that caused the others' failure (`root_cause`): where it ran, how it
    ended, its own message if any and the end of its output."""
    rank = root_cause(exc.failures)
    failure = exc.failures[rank]
    message = _message(failure)
    return {
        "ok": False,
        "cause": "rank",
        "rank": rank,
        "local_rank": failure.local_rank,
        "host": socket.gethostname(),  # a failure this agent saw: a rank of this node
        "exitcode": failure.exitcode,
        "signal": failure.signal_name() if failure.exitcode < 0 else None,
        "message": message.strip(),  # "<ErrorClass>: <text>" (torch's @record on the rank)
        "output": last_output(log_dir, failure.local_rank),
    }


def main(argv: list[str]) -> int:
    outcome_file, torchrun_args = Path(argv[0]), argv[2:]  # OUTCOME.json -- <args>
    rendezvous = Rendezvous()
    registry.handler_registry.register(BACKEND, rendezvous.create)
    args = parse_args(torchrun_args)
    nnodes = int(str(args.nnodes).split(":")[-1])
    rendezvous.watch()
    start = time.monotonic()
    try:
        run(args)
        outcome = {"ok": True}
    except RendezvousTimeoutError:
        outcome = {
            "ok": False,
            "cause": "rendezvous",
            "joined": min(rendezvous.joined, nnodes - 1),
            "nnodes": nnodes,
            "seconds": round(time.monotonic() - start),
        }
    except ChildFailedError as exc:
        outcome = rank_outcome(exc, args.log_dir)
    outcome_file.write_text(json.dumps(outcome))
    return 0 if outcome["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
