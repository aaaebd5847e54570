"""The latency harness: one engine at a time, warm-up first, percentiles and throughput.

Callers fix thread counts before timing (onnxruntime intra-op threads, torch.set_num_threads)
and never time two engines at once, so no thread pools compete.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np


def latency_ms(
    run: Callable[[object], object], inputs: Sequence[object], warmup: int, runs: int
) -> dict[str, float]:
    """p50/p95/p99 latency of single calls in milliseconds, cycling through inputs."""
    for i in range(warmup):
        run(inputs[i % len(inputs)])
    samples = np.empty(runs)
    for i in range(runs):
        start = time.perf_counter()
        run(inputs[i % len(inputs)])
        samples[i] = (time.perf_counter() - start) * 1000
    p50, p95, p99 = np.percentile(samples, [50, 95, 99])
    return {"p50_ms": float(p50), "p95_ms": float(p95), "p99_ms": float(p99)}


def throughput(
    run: Callable[[object], object],
    batches: Sequence[object],
    batch_size: int,
    min_batches: int = 4,
) -> float:
    """Examples per second over full batches (one warm-up batch, then at least min_batches)."""
    run(batches[0])
    n = max(min_batches, len(batches))
    start = time.perf_counter()
    for i in range(n):
        run(batches[i % len(batches)])
    return n * batch_size / (time.perf_counter() - start)
