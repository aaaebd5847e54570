"""Prefect flows: composition of the tasks/ stages, and the CLI."""

import os

# The embedded temporary Prefect server would try to send telemetry to the internet.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
