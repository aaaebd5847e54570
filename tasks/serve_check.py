"""Stage 7: serve the chosen ONNX model with onnxruntime; predictions, latency, throughput.

The merged PyTorch fp32 model (eager) is timed in the same run as the baseline, one engine at
a time, with the same thread count; each engine is timed with and without tokenization.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from mlflow.tracking import MlflowClient

from tasks.config import PipelineConfig
from tasks.evaluate import load_test_split
from tasks.latency import latency_ms, throughput
from tasks.merge import MergedModel
from tasks.metrics import classification_metrics, save_figure, timing_figure
from tasks.modeling import load_classifier, load_tokenizer
from tasks.onnx_runtime import open_session, session_logits
from tasks.prepare_data import PreparedData
from tasks.quantize import SERVED_FILE, QuantizedModel
from tasks.stage import stage_task
from tasks.tracking import connect, log_metrics, set_tags, stage_timer


@dataclass(frozen=True)
class ServeReport:
    """What the served model scored, its answers, and how fast both engines answered.

    Classification fills predictions (label ids); causal_lm fills answers (generated texts) and
    scores (registry.metric per eval prompt, for the champion comparison).
    """

    provider: str
    metrics: dict[str, float]
    timings: dict[str, float]
    predictions: list[int] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)


def _runners(session, torch_model, tokenizer, max_length: int):
    """Per engine: run(pre-tokenized batch) and run_text(list of texts)."""
    wanted = {i.name for i in session.get_inputs()}

    def onnx_run(batch):
        return session.run(
            ["logits"], {k: v.astype(np.int64) for k, v in batch.items() if k in wanted}
        )

    @torch.inference_mode()
    def torch_run(batch):
        return torch_model(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits

    def with_tokenizer(run):
        return lambda texts: run(
            tokenizer(
                texts, padding=True, truncation=True, max_length=max_length, return_tensors="np"
            )
        )

    return {
        "onnx": (onnx_run, with_tokenizer(onnx_run)),
        "torch": (torch_run, with_tokenizer(torch_run)),
    }


def time_engines(
    config: PipelineConfig, session, torch_model, tokenizer, texts
) -> dict[str, float]:
    """Batch-1 p50/p95/p99 and throughput per batch size, per engine, with and without tokenizer."""
    serve = config.serve
    max_length = config.data.max_length
    texts = list(texts)
    timings: dict[str, float] = {}
    for engine, (run, run_text) in _runners(session, torch_model, tokenizer, max_length).items():
        singles = [[t] for t in texts]
        encoded = [
            tokenizer(t, truncation=True, max_length=max_length, return_tensors="np")
            for t in singles
        ]
        for suffix, fn, inputs in (("", run, encoded), ("_with_tokenizer", run_text, singles)):
            stats = latency_ms(fn, inputs, serve.warmup_runs, serve.latency_runs)
            timings |= {f"serve.{engine}.batch1_{k}{suffix}": v for k, v in stats.items()}
        for size in serve.throughput_batch_sizes:
            pool = texts * -(-size // len(texts))  # repeat when the split is smaller than a batch
            text_batches = [pool[i : i + size] for i in range(0, len(pool) - size + 1, size)]
            batches = [
                tokenizer(
                    b, padding=True, truncation=True, max_length=max_length, return_tensors="np"
                )
                for b in text_batches
            ]
            timings[f"serve.{engine}.batch{size}_per_second"] = throughput(run, batches, size)
            timings[f"serve.{engine}.batch{size}_per_second_with_tokenizer"] = throughput(
                run_text, text_batches, size
            )
    timings["serve.speedup.batch1_p50"] = (
        timings["serve.torch.batch1_p50_ms"] / timings["serve.onnx.batch1_p50_ms"]
    )
    for size in serve.throughput_batch_sizes:
        timings[f"serve.speedup.batch{size}_throughput"] = (
            timings[f"serve.onnx.batch{size}_per_second"]
            / timings[f"serve.torch.batch{size}_per_second"]
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
    if config.task == "causal_lm":
        from tasks.causal.serve_check import serve_check_causal  # it imports this module

        return serve_check_causal(config, data, quantized, merged, run_id)
    connect(config.tracking)
    with stage_timer(run_id, "serve_check"):
        threads = config.serve.num_threads or os.cpu_count() or 1
        torch.set_num_threads(threads)
        session = open_session(quantized.model.fetch() / SERVED_FILE, config.serve.device, threads)
        provider = session.get_providers()[0]
        test = load_test_split(data)
        tokenizer = load_tokenizer(config.model)
        logits = session_logits(
            session, tokenizer, test["text"], config.data.max_length, config.eval.batch_size
        )
        predictions = np.argmax(logits, -1)
        metrics = classification_metrics(
            test["labels"], predictions, data.label_names, per_class=False
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
                "serve.onnx_variant": quantized.variant,
            },
        )
        figure = timing_figure(timings, config.serve.throughput_batch_sizes, quantized.variant)
        path = save_figure(
            figure, Path(config.output_dir) / run_id / "plots" / "serving_latency.png"
        )
        MlflowClient().log_artifact(run_id, str(path), "plots")
    return ServeReport(
        provider=provider,
        metrics=metrics,
        timings=timings,
        predictions=[int(p) for p in predictions],
    )


serve_check_task = stage_task(serve_check, name="serve-check", retries=1)
