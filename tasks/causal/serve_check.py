"""serve_check for causal_lm: the served model's answers, time to first token, tokens per second.

Answers come from the pyfunc class that `mlflow models serve` runs (tasks/serving/
onnx_causal_lm.py), loaded in-process on the serving folder, so the served-model check in the
register stage compares like with like. Timings, one engine at a time with the same thread
count: the served ONNX file (KV cache, onnxruntime) and the merged PyTorch model (eager, KV
cache), each at batch 1 with tokenization included: time to first token (prefill plus one
token) and decode throughput (serve.decode_tokens new tokens per request).
"""

from __future__ import annotations

import json
import time

from tasks.causal.data import load_data_tokenizer
from tasks.causal.evaluate import eval_prompts
from tasks.causal.generation import greedy_new_tokens
from tasks.causal.modeling import load_causal_lm, open_causal_onnx
from tasks.causal.onnx_causal_lm import OnnxCausalLM
from tasks.causal.serving import serving_spec
from tasks.causal.text_metrics import generation_metrics, per_example
from tasks.common.config import PipelineConfig
from tasks.common.latency import latency_ms
from tasks.common.onnx import SERVED_FILE
from tasks.common.plots import engine_figure
from tasks.common.serving import build_serving_folder, log_serve_check, serving_threads
from tasks.common.serving import serving_spec as full_spec
from tasks.common.stage import StageContext
from tasks.records import MergedModel, PreparedData, QuantizedModel, ServeReport


def time_decoder(model, tokenizer, prompts, config: PipelineConfig) -> dict[str, float]:
    """TTFT percentiles and decode tokens/second of one engine at batch 1."""
    serve = config.serve
    first = latency_ms(
        lambda p: greedy_new_tokens(model, tokenizer, [p], 1),
        prompts,
        serve.warmup_runs,
        serve.latency_runs,
    )
    steps = serve.decode_tokens
    runs = max(3, serve.latency_runs // 10)
    start = time.perf_counter()
    for i in range(runs):
        greedy_new_tokens(model, tokenizer, [prompts[i % len(prompts)]], steps, steps)
    per_second = runs * steps / (time.perf_counter() - start)
    return {
        "ttft_p50_ms": first["p50_ms"],
        "ttft_p95_ms": first["p95_ms"],
        "ttft_p99_ms": first["p99_ms"],
        "tokens_per_second": per_second,
    }


def decoder_timing_figure(timings: dict[str, float], variant: str):
    """Time to first token percentiles and decode tokens/s, both engines."""
    return engine_figure(
        timings,
        variant,
        left=(
            "time to first token (ms, batch 1)",
            ["p50", "p95", "p99"],
            [f"serve/{{engine}}.ttft_{p}_ms" for p in ("p50", "p95", "p99")],
        ),
        right=(
            "decode tokens / second (batch 1)",
            ["decode"],
            ["serve/{engine}.tokens_per_second"],
        ),
    )


def engine_timings(config, serving_dir, merged_dir, tokenizer, prompts, threads):
    """time_decoder for the served ONNX file, then for the merged PyTorch model; returns the
    served file's execution provider and the timings."""
    session = open_causal_onnx(serving_dir, SERVED_FILE, config.serve.device, threads)
    provider = session.providers[0]
    timings = {
        f"serve/onnx.{k}": v for k, v in time_decoder(session, tokenizer, prompts, config).items()
    }
    del session
    eager = load_causal_lm(str(merged_dir)).eval()
    timings |= {
        f"serve/torch.{k}": v for k, v in time_decoder(eager, tokenizer, prompts, config).items()
    }
    timings["serve/speedup.ttft_p50"] = (
        timings["serve/torch.ttft_p50_ms"] / timings["serve/onnx.ttft_p50_ms"]
    )
    timings["serve/speedup.tokens_per_second"] = (
        timings["serve/onnx.tokens_per_second"] / timings["serve/torch.tokens_per_second"]
    )
    return provider, timings


def serve_check(
    stage: StageContext, data: PreparedData, quantized: QuantizedModel, merged: MergedModel
) -> ServeReport:
    """Answer the eval prompts with the served model; time it against PyTorch."""
    config = stage.config
    threads = serving_threads(config)
    serving_dir = build_serving_folder(
        stage.fetch(quantized.model),
        stage.stage_dir("serving_model"),
        full_spec(config, quantized.variant, serving_spec(stage, data)),
    )
    rows = eval_prompts(stage, data)
    served = OnnxCausalLM.from_folder(serving_dir)
    replies = served.answer([json.loads(m) for m in rows["messages"]], config.eval.max_new_tokens)
    answers = [r["text"] for r in replies]
    references = list(rows["reference"])
    metrics = generation_metrics(answers, references)
    provider, timings = engine_timings(
        config,
        serving_dir,
        stage.fetch(merged.model),
        load_data_tokenizer(stage, data),
        list(rows["prompt"]),
        threads,
    )
    log_serve_check(
        stage,
        metrics,
        timings,
        decoder_timing_figure(timings, quantized.variant),
        {
            "serve.provider": provider,
            "serve.threads": str(threads),
            "serve.onnx_variant": quantized.variant,
        },
    )
    return ServeReport(
        provider=provider,
        metrics=metrics,
        timings=timings,
        answers=answers,
        references=references,
        scores=per_example(config.registry.metric, answers, references),
    )
