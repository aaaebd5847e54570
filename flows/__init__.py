"""Prefect flows: composition of the tasks/ stages, and the CLI."""

import os

# The embedded temporary Prefect server would try to send telemetry to the internet.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Its default 20 s start-up allowance is too short on a busy 2-core machine.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
