"""serve_check for classification: the served ONNX model's answers, latency and throughput.

The merged PyTorch model is timed in the same run as the baseline, one engine at a time, with
the same thread count: fp32 eager, and on a CPU with bf16 matrix kernels (AMX-BF16,
AVX512-BF16) also under bf16 autocast, the fastest PyTorch there is on such a CPU. Each engine
is timed with and without tokenization; the speedups are against both peers. The served model
is timed as it serves a request (texts batched by length, as its pyfunc does); PyTorch as its
users run it (one batch padded to its longest text).
"""

from __future__ import annotations

import numpy as np
import torch

from tasks.classification.data import label_names, load_split
from tasks.classification.metrics import classification_metrics
from tasks.classification.modeling import load_classifier, session_feed, session_logits
from tasks.classification.onnx_text_classifier import length_grouped
from tasks.common.config import PipelineConfig
from tasks.common.hardware import bf16_kernels
from tasks.common.latency import interleaved, per_second, percentiles_ms
from tasks.common.models import load_tokenizer
from tasks.common.onnx import SERVED_FILE, open_session
from tasks.common.plots import engine_figure
from tasks.common.serving import log_serve_check, serving_threads
from tasks.common.stage import StageContext
from tasks.records import MergedModel, PreparedData, QuantizedModel, ServeReport

PEERS = {"torch": "speedup", "torch_bf16": "speedup_vs_bf16"}  # peer engine -> metric group


def _engines(session, torch_model, tokenizer, max_length: int, batch_size: int, bf16: bool):
    """Per engine: prepare(texts) -> its input, and run(input). The served ONNX model takes
    the texts as the pyfunc does (length_grouped: batches of similar length); PyTorch, the
    peer, takes them as one batch padded to its longest text, as transformers users do."""

    def grouped(texts):
        return list(length_grouped(tokenizer, texts, max_length, batch_size))

    def padded(texts):
        return tokenizer(
            texts, padding=True, truncation=True, max_length=max_length, return_tensors="np"
        )

    def onnx_run(batches):
        return [session.run(["logits"], session_feed(session, b)) for _, b in batches]

    @torch.inference_mode()
    def torch_run(batch):
        return torch_model(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits

    def torch_bf16_run(batch):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return torch_run(batch)

    engines = {"onnx": (grouped, onnx_run), "torch": (padded, torch_run)}
    if bf16:
        engines["torch_bf16"] = (padded, torch_bf16_run)
    return engines


def speedups(timings: dict[str, float], sizes: list[int]) -> dict[str, float]:
    """ONNX against each PyTorch peer that was timed: batch-1 p50 and throughput ratios."""
    ratios = {}
    for peer, group in PEERS.items():
        if f"serve/{peer}.batch1_p50_ms" not in timings:
            continue
        ratios[f"serve/{group}.batch1_p50"] = (
            timings[f"serve/{peer}.batch1_p50_ms"] / timings["serve/onnx.batch1_p50_ms"]
        )
        for size in sizes:
            ratios[f"serve/{group}.batch{size}_throughput"] = (
                timings[f"serve/onnx.batch{size}_per_second"]
                / timings[f"serve/{peer}.batch{size}_per_second"]
            )
    return ratios


def cycling(items: list, fn):
    """A run for `interleaved`: call k sends items[k] (cycling) to fn."""
    return lambda k: fn(items[k % len(items)])


def time_engines(
    config: PipelineConfig, session, torch_model, tokenizer, texts
) -> dict[str, float]:
    """Batch-1 p50/p95/p99 and throughput per batch size, per engine, with and without
    tokenizer. The engines take turns in blocks of calls (tasks/common/latency.interleaved):
    every ratio compares figures measured under the same machine load."""
    serve = config.serve
    texts = list(texts)
    timings: dict[str, float] = {}
    bf16 = bf16_kernels() is not None  # the PyTorch peer runs on this CPU
    engines = _engines(
        session, torch_model, tokenizer, config.data.max_length, config.eval.batch_size, bf16
    )

    def both(requests: list[list[str]]) -> dict[str, dict]:
        """Per suffix, per engine: the run on prepared input, and on texts (tokenizer too)."""
        return {
            "": {e: cycling([p(r) for r in requests], run) for e, (p, run) in engines.items()},
            "_with_tokenizer": {
                e: cycling(requests, lambda r, p=p, run=run: run(p(r)))
                for e, (p, run) in engines.items()
            },
        }

    for suffix, runs in both([[t] for t in texts]).items():
        samples = interleaved(runs, serve.latency_runs, warmup=serve.warmup_runs)
        for engine, ms in samples.items():
            stats = percentiles_ms(ms)
            timings |= {f"serve/{engine}.batch1_{k}{suffix}": v for k, v in stats.items()}
    for size in serve.throughput_batch_sizes:
        pool = texts * -(-size // len(texts))  # repeat when the split is smaller than a batch
        requests = [pool[i : i + size] for i in range(0, len(pool) - size + 1, size)]
        for suffix, runs in both(requests).items():
            samples = interleaved(runs, max(8, len(requests)), block=2, warmup=1)
            for engine, ms in samples.items():
                timings[f"serve/{engine}.batch{size}_per_second{suffix}"] = per_second(ms, size)
    return timings | speedups(timings, serve.throughput_batch_sizes)


def timing_figure(timings: dict[str, float], sizes: list[int], variant: str):
    """Batch-1 latency percentiles and throughput per batch size, every engine timed."""
    return engine_figure(
        timings,
        variant,
        left=(
            "batch-1 latency (ms, model only)",
            ["p50", "p95", "p99"],
            [f"serve/{{engine}}.batch1_{p}_ms" for p in ("p50", "p95", "p99")],
        ),
        right=(
            "examples / second (model only)",
            [f"batch {s}" for s in sizes],
            [f"serve/{{engine}}.batch{s}_per_second" for s in sizes],
        ),
    )


def serve_check(
    stage: StageContext, data: PreparedData, quantized: QuantizedModel, merged: MergedModel
) -> ServeReport:
    """Predict the test split with the serving session and time it against PyTorch."""
    config = stage.config
    threads = serving_threads(config)
    session = open_session(stage.fetch(quantized.model) / SERVED_FILE, config.serve.device, threads)
    names = label_names(stage, data)
    test = load_split(stage, data, "test")
    tokenizer = load_tokenizer(config.model)
    logits = session_logits(
        session, tokenizer, test["text"], config.data.max_length, config.eval.batch_size
    )
    predictions = np.argmax(logits, -1)
    metrics = classification_metrics(test["labels"], predictions, names, per_class=False)
    torch_model = load_classifier(str(stage.fetch(merged.model)), names).eval()
    timings = time_engines(config, session, torch_model, tokenizer, test["text"])
    provider = session.get_providers()[0]
    log_serve_check(
        stage,
        metrics,
        timings,
        timing_figure(timings, config.serve.throughput_batch_sizes, quantized.variant),
        {
            "serve.provider": provider,
            "serve.threads": str(threads),
            "serve.providers": ",".join(session.get_providers()),
            "serve.onnx_variant": quantized.variant,
        },
    )
    answers = [names[int(p)] for p in predictions]
    references = list(test["label"])
    return ServeReport(
        provider=provider,
        metrics=metrics,
        timings=timings,
        answers=answers,
        references=references,
        scores=[float(a == r) for a, r in zip(answers, references, strict=True)],
    )
