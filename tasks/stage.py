"""The one way a stage function becomes a Prefect task: retries for transient failures only."""

from __future__ import annotations

from collections.abc import Callable

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.errors import retry_unless_user_error


def stage_task(fn: Callable, *, name: str, retries: int = 1, tags: tuple[str, ...] = ()):
    """Wrap a plain stage function as a task; fn itself stays a plain, testable function.

    No result caching (a stage's inputs are small records; its outputs live in MLflow), and a
    bad input or a failed gate is never retried, while network or disk errors are (5 s apart).
    """
    return task(
        fn,
        name=name,
        retries=retries,
        retry_delay_seconds=5,
        cache_policy=NO_CACHE,
        retry_condition_fn=retry_unless_user_error,
        tags=list(tags),
    )
