"""Stage 7: serve the quantized model with onnxruntime; predictions, latency, throughput.

The merged PyTorch fp32 model is timed in the same run, one engine at a time, as the baseline.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.config import PipelineConfig, ServeConfig
from tasks.errors import retry_unless_user_error
from tasks.evaluate import load_test_split
from tasks.merge import MergedModel
from tasks.metrics import classification_metrics
from tasks.modeling import load_classifier, load_tokenizer
from tasks.onnx_runtime import open_session, session_logits
from tasks.prepare_data import PreparedData
from tasks.quantize import QUANTIZED_FILE, QuantizedModel
from tasks.tracking import connect, log_metrics, set_tags, stage_timer


@dataclass(frozen=True)
class ServeReport:
    """What the served (quantized) model scored and how fast both engines answered."""

    provider: str
    metrics: dict[str, float]
    timings: dict[str, float]


def latency_ms(run: Callable[[dict], object], inputs: list[dict], warmup: int, runs: int) -> dict:
    """p50/p95 of single-request latency in milliseconds, cycling through the inputs."""
    for i in range(warmup):
        run(inputs[i % len(inputs)])
    samples = []
    for i in range(runs):
        start = time.perf_counter()
        run(inputs[i % len(inputs)])
        samples.append((time.perf_counter() - start) * 1000)
    return {
        "p50_ms": float(np.percentile(samples, 50)),
        "p95_ms": float(np.percentile(samples, 95)),
    }


def throughput(
    run: Callable[[dict], object], batches: list[dict], batch_size: int, min_batches: int = 4
) -> float:
    """Examples per second over full batches (at least min_batches, cycling)."""
    run(batches[0])  # warm-up
    n = max(min_batches, len(batches))
    start = time.perf_counter()
    for i in range(n):
        run(batches[i % len(batches)])
    return n * batch_size / (time.perf_counter() - start)


def _encode(tokenizer, texts, max_length, batch_size) -> list[dict]:
    return [
        tokenizer(
            list(texts[i : i + batch_size]),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="np",
        )
        for i in range(0, len(texts) - batch_size + 1, batch_size)
    ]


def time_engines(
    config: PipelineConfig, session, torch_model, tokenizer, texts
) -> dict[str, float]:
    """Batch-1 latency and batch-N throughput for onnxruntime and PyTorch, one after the other."""
    serve: ServeConfig = config.serve
    singles = _encode(tokenizer, texts, config.data.max_length, 1)
    n = serve.throughput_batch_size
    reps = -(-n // len(texts))  # repeat the test texts when the split is smaller than one batch
    batches = _encode(tokenizer, list(texts) * reps, config.data.max_length, n)
    wanted = {i.name for i in session.get_inputs()}

    def run_onnx(batch):
        return session.run(
            ["logits"], {k: v.astype(np.int64) for k, v in batch.items() if k in wanted}
        )

    @torch.inference_mode()
    def run_torch(batch):
        return torch_model(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits

    timings = {}
    for engine, run in (("onnx_int8", run_onnx), ("torch_fp32", run_torch)):
        for key, value in latency_ms(run, singles, serve.warmup_runs, serve.latency_runs).items():
            timings[f"serve.{engine}.batch1_{key}"] = value
        timings[f"serve.{engine}.batch{n}_per_second"] = throughput(run, batches, n)
    timings["serve.latency_speedup_p50"] = (
        timings["serve.torch_fp32.batch1_p50_ms"] / timings["serve.onnx_int8.batch1_p50_ms"]
    )
    timings[f"serve.throughput_speedup_batch{n}"] = (
        timings[f"serve.onnx_int8.batch{n}_per_second"]
        / timings[f"serve.torch_fp32.batch{n}_per_second"]
    )
    return timings


def serve_check(
    config: PipelineConfig,
    data: PreparedData,
    quantized: QuantizedModel,
    merged: MergedModel,
    run_id: str,
) -> ServeReport:
    """Predict the test split with the serving session and time it against PyTorch."""
    connect(config.tracking)
    with stage_timer(run_id, "serve_check"):
        threads = config.serve.num_threads or os.cpu_count() or 1
        torch.set_num_threads(threads)
        session = open_session(
            quantized.model.fetch() / QUANTIZED_FILE, config.serve.device, threads
        )
        provider = session.get_providers()[0]
        test = load_test_split(data)
        tokenizer = load_tokenizer(config.model)
        logits = session_logits(
            session, tokenizer, test["text"], config.data.max_length, config.eval.batch_size
        )
        metrics = classification_metrics(
            test["labels"], np.argmax(logits, -1), data.label_names, per_class=False
        )
        torch_model = load_classifier(str(merged.model.fetch()), data.label_names).eval()
        timings = time_engines(config, session, torch_model, tokenizer, test["text"])
        log_metrics(run_id, {f"served.{k}": v for k, v in metrics.items()} | timings)
        set_tags(
            run_id,
            {
                "serve.provider": provider,
                "serve.threads": str(threads),
                "serve.providers": ",".join(session.get_providers()),
            },
        )
    return ServeReport(provider=provider, metrics=metrics, timings=timings)


@task(
    name="serve-check",
    retries=1,
    retry_delay_seconds=5,
    cache_policy=NO_CACHE,
    retry_condition_fn=retry_unless_user_error,
)
def serve_check_task(
    config: PipelineConfig,
    data: PreparedData,
    quantized: QuantizedModel,
    merged: MergedModel,
    run_id: str,
) -> ServeReport:
    """Prefect wrapper around serve_check."""
    return serve_check(config, data, quantized, merged, run_id)
