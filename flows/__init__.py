"""Prefect flows: composition of the tasks/ stages, and the CLI."""
