"""Fault points: where the tests kill the pipeline with SIGKILL, to prove that it recovers.

With LORA_RETRAIN_KILL_AT=<point> in its environment, the process kills itself (SIGKILL, no
clean-up of any kind) on reaching that point; without it (always, outside the tests) a fault
point does nothing. The points: `before:<stage>` for each stage, and the steps of the register
transaction `register:<step>` (see tasks/register/transaction.py).
"""

from __future__ import annotations

import os
import signal
import sys

KILL_AT_ENV = "LORA_RETRAIN_KILL_AT"


def kill_point(name: str) -> None:
    """SIGKILL this process here if the environment names this point."""
    if os.environ.get(KILL_AT_ENV) == name:
        print(f"fault point {name}: SIGKILL", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
