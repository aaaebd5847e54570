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
import os
import time
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

from tasks.causal.data import load_data_tokenizer
from tasks.causal.evaluate import eval_prompts
from tasks.causal.generation import greedy_new_tokens
from tasks.causal.modeling import load_causal_lm, open_causal_onnx
from tasks.causal.text_metrics import generation_metrics, per_example
from tasks.config import PipelineConfig
from tasks.latency import latency_ms
from tasks.merge import MergedModel
from tasks.metrics import decoder_timing_figure, save_figure
from tasks.prepare_data import PreparedData
from tasks.quantize import SERVED_FILE, QuantizedModel
from tasks.serve_check import ServeReport
from tasks.serving.onnx_causal_lm import OnnxCausalLM
from tasks.serving_folder import build_serving_folder
from tasks.tracking import connect, log_metrics, set_tags, stage_timer


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


def serve_check_causal(
    config: PipelineConfig,
    data: PreparedData,
    quantized: QuantizedModel,
    merged: MergedModel,
    run_id: str,
) -> ServeReport:
    """Answer the eval prompts with the served model; time it against PyTorch."""
    connect(config.tracking)
    with stage_timer(run_id, "serve_check"):
        threads = config.serve.num_threads or os.cpu_count() or 1
        torch.set_num_threads(threads)
        serving_dir = build_serving_folder(config, data, quantized, run_id)
        rows = eval_prompts(config, data)
        served = OnnxCausalLM.from_folder(serving_dir)
        replies = served.answer(
            [json.loads(m) for m in rows["messages"]], config.eval.max_new_tokens
        )
        answers = [r["text"] for r in replies]
        references = list(rows["reference"])
        metrics = generation_metrics(answers, references)
        scores = per_example(config.registry.metric, answers, references)

        tokenizer = load_data_tokenizer(data)
        prompts = list(rows["prompt"])
        session = open_causal_onnx(serving_dir, SERVED_FILE, config.serve.device, threads)
        provider = session.providers[0]
        timings = {
            f"serve.onnx.{k}": v
            for k, v in time_decoder(session, tokenizer, prompts, config).items()
        }
        del session
        eager = load_causal_lm(str(merged.model.fetch())).eval()
        timings |= {
            f"serve.torch.{k}": v
            for k, v in time_decoder(eager, tokenizer, prompts, config).items()
        }
        timings["serve.speedup.ttft_p50"] = (
            timings["serve.torch.ttft_p50_ms"] / timings["serve.onnx.ttft_p50_ms"]
        )
        timings["serve.speedup.tokens_per_second"] = (
            timings["serve.onnx.tokens_per_second"] / timings["serve.torch.tokens_per_second"]
        )
        log_metrics(run_id, {f"served.{k}": v for k, v in metrics.items()} | timings)
        figure = decoder_timing_figure(timings, quantized.variant)
        path = save_figure(
            figure, Path(config.output_dir) / run_id / "plots" / "serving_latency.png"
        )
        MlflowClient().log_artifact(run_id, str(path), "plots")
        set_tags(
            run_id,
            {
                "serve.provider": provider,
                "serve.threads": str(threads),
                "serve.onnx_variant": quantized.variant,
            },
        )
    return ServeReport(
        provider=provider, metrics=metrics, timings=timings, answers=answers, scores=scores
    )
