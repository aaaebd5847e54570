"""The latency harness: one engine at a time, warm-up first, percentiles and throughput.

Callers fix thread counts before timing (onnxruntime intra-op threads, torch.set_num_threads)
and never time two engines at once, so no thread pools compete. To compare engines under the
same machine load, `interleaved` lets them take turns in blocks of calls: onnxruntime's and
OpenMP's threads spin for a while after each call, so one call each in turn would time every
engine against the others' spinning threads.
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


def interleaved(
    runs: dict[str, Callable[[int], object]], calls: int, block: int = 10, warmup: int = 0
) -> dict[str, np.ndarray]:
    """Milliseconds of each run's timed calls, the runs taking turns in blocks of `block`
    calls (order alternating) until each made `calls` timed calls. A run is called with the
    call's number (to pick its input). Each run first makes `warmup` untimed calls, and the
    first call of every block is not timed: it meets the previous run's spinning threads."""
    for run in runs.values():
        for i in range(warmup):
            run(i)
    samples: dict[str, list[float]] = {name: [] for name in runs}
    names, made, turn = list(runs), 0, 0
    while made < calls:
        size = min(block, calls - made)
        for name in names if turn % 2 == 0 else reversed(names):
            for i in range(size + 1):
                start = time.perf_counter()
                runs[name](made + i)
                if i:
                    samples[name].append((time.perf_counter() - start) * 1000)
        made, turn = made + size, turn + 1
    return {name: np.asarray(times) for name, times in samples.items()}


def percentiles_ms(samples: np.ndarray) -> dict[str, float]:
    """p50/p95/p99 of a run's call times in milliseconds."""
    p50, p95, p99 = np.percentile(samples, [50, 95, 99])
    return {"p50_ms": float(p50), "p95_ms": float(p95), "p99_ms": float(p99)}


def per_second(samples: np.ndarray, batch_size: int) -> float:
    """Examples per second of calls of batch_size examples (their mean time)."""
    return batch_size * 1000 / float(np.mean(samples))
