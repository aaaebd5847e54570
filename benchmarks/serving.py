"""Serving goals on this CPU: the served ONNX model vs PyTorch fp32 eager and bf16, in one run.

Trains the default pipeline's model (temporary MLflow store), exports and quantizes it with
the quantize stage (which keeps the fastest variant that passes the gates), then times every
engine one after the other with the same thread count: onnxruntime (the served variant),
PyTorch fp32 eager and, on a CPU with bf16 matrix kernels (AMX-BF16, AVX512-BF16), PyTorch
under bf16 autocast, the strongest PyTorch peer there. It prints the ratios the goals use:

    batch-1 p50 latency ratio (ONNX / PyTorch fp32)     goal <= 0.125
    batch-1 p50 latency ratio (ONNX / PyTorch bf16)     goal <= 0.25
    batch-32 throughput ratio (ONNX / PyTorch fp32)     goal >= 4
    batch-32 throughput ratio (ONNX / PyTorch bf16)     goal >= 2
    accuracy drop (fp32 ONNX - served, points)          goal <= 0.5
    served model file size / fp32 ONNX size             goal <= 0.30

and the physical limit: the model's FLOPs per token and the share of this CPU's dense fp32 and
bf16 peak that batch-32 serving reaches (real tokens only: padding is not counted as work).

    .venv/bin/python benchmarks/serving.py [--runs 200] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from flows.retrain import run_stages
from tasks.classification.data import label_names, load_split
from tasks.classification.modeling import load_classifier, session_feed, session_logits
from tasks.classification.onnx_text_classifier import length_grouped
from tasks.classification.serve_check import cycling, time_engines
from tasks.common.config import load_config
from tasks.common.hardware import flops_per_token, fmt_flops, peak_flops
from tasks.common.latency import interleaved
from tasks.common.models import load_tokenizer
from tasks.common.onnx import ONNX_FILE, SERVED_FILE, open_session
from tasks.common.plots import ENGINES
from tasks.common.stage import StageContext
from tasks.common.tracking import Tracking, start_pipeline_run

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    parser.add_argument("--runs", type=int, default=200, help="timed batch-1 requests per engine")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    store = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    config = load_config(
        args.config,
        [
            f"tracking.uri=sqlite:///{store / 'mlflow.db'}",
            f"tracking.artifact_location={(store / 'art').as_uri()}",
            f"output_dir={store / 'out'}",
            f"serve.latency_runs={args.runs}",
            "serve.warmup_runs=20",
            "serve.throughput_batch_sizes=[8, 32]",
            *args.overrides,
        ],
    )

    run_id = start_pipeline_run(config)
    out = run_stages(config, run_id, until="quantize")
    data, merged, onnx, quantized = out.data, out.merged, out.onnx, out.quantized
    stage = StageContext(config, Tracking.connect(config.tracking).run(run_id), "bench", 0.0)

    threads = config.serve.num_threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    session = open_session(stage.fetch(quantized.model) / SERVED_FILE, "cpu", threads)
    names = label_names(stage, data)
    torch_model = load_classifier(str(stage.fetch(merged.model)), names).eval()
    texts = load_split(stage, data, "test")["text"]
    t = time_engines(config, session, torch_model, load_tokenizer(config.model), texts)

    fp32_mb = (stage.fetch(onnx.model) / ONNX_FILE).stat().st_size / 2**20
    served_mb = (stage.fetch(quantized.model) / SERVED_FILE).stat().st_size / 2**20
    drop_points = 100 * (quantized.fp32_score - quantized.served_score)

    print(f"\nserved variant: {quantized.variant} ({quantized.reason}); threads: {threads}")
    print(f"{'variant':<22}{'accuracy':>10}{'agreement':>11}{'p50 ms':>9}{'MB':>8}{'gates':>7}")
    print(f"{'fp32 (onnx)':<22}{quantized.fp32_score:>10.4f}{1.0:>11.4f}{'':>9}{fp32_mb:>8.1f}")
    for c in quantized.candidates:
        print(
            f"{c.name:<22}{c.scores['accuracy']:>10.4f}{c.scores['top1_agreement']:>11.4f}"
            f"{c.p50_ms:>9.2f}"
            f"{c.size_mb:>8.1f}{'pass' if c.passed else 'FAIL':>7}"
        )
    print(
        f"\n{'engine':<12}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'p50+tok':>9}"
        f"{'b8/s':>9}{'b32/s':>9}{'b32+tok/s':>11}"
    )
    engines = [e for e in ENGINES if f"serve/{e}.batch1_p50_ms" in t]
    for engine in engines:
        e = {
            k.removeprefix(f"serve/{engine}."): v
            for k, v in t.items()
            if k.startswith(f"serve/{engine}.")
        }
        print(
            f"{engine:<12}{e['batch1_p50_ms']:>9.2f}{e['batch1_p95_ms']:>9.2f}"
            f"{e['batch1_p99_ms']:>9.2f}{e['batch1_p50_ms_with_tokenizer']:>9.2f}"
            f"{e['batch8_per_second']:>9.0f}{e['batch32_per_second']:>9.0f}"
            f"{e['batch32_per_second_with_tokenizer']:>11.0f}"
        )
    print()
    for peer, goal_latency, goal_throughput in (("torch", 0.125, 4), ("torch_bf16", 0.25, 2)):
        if peer not in engines:
            print(f"{peer}: not timed (this CPU has no bf16 matrix kernels)")
            continue
        latency_ratio = t["serve/onnx.batch1_p50_ms"] / t[f"serve/{peer}.batch1_p50_ms"]
        throughput_ratio = (
            t["serve/onnx.batch32_per_second"] / t[f"serve/{peer}.batch32_per_second"]
        )
        print(f"batch1_p50_latency_ratio vs {peer} = {latency_ratio:.3f}  (goal <= {goal_latency})")
        print(
            f"batch32_throughput_ratio vs {peer} = {throughput_ratio:.2f}"
            f"  (goal >= {goal_throughput})"
        )
    print(f"accuracy_drop_points = {drop_points:.2f}  (goal <= 0.5)")
    print(f"model_size_ratio = {served_mb / fp32_mb:.3f}  (goal <= 0.30)")
    tokenizer = load_tokenizer(config.model)
    served_file = stage.fetch(quantized.model) / SERVED_FILE
    print_choices(config, served_file, session, torch_model, tokenizer, list(texts), threads)
    print_physical_limit(torch_model, tokenizer, texts, t, engines, config)


def cycled(runs: dict, requests: list) -> dict:
    """Each run as `interleaved` calls it: call k sends requests[k] (cycling)."""
    return {name: cycling(requests, run) for name, run in runs.items()}


def medians(samples: dict) -> dict[str, float]:
    return {name: float(np.median(ms)) for name, ms in samples.items()}


def print_choices(config, served_file, session, torch_model, tokenizer, texts, threads) -> None:
    """The two serving choices side by side: SkipLayerNormalization fused by the session (as
    onnxruntime does by default) against left apart (CPU_SESSION_CONFIG), at batch 1 and 32;
    and batching by length (the served pyfunc) against one padded batch, for both engines."""
    length, size = config.data.max_length, config.eval.batch_size
    plain = ort.SessionOptions()
    plain.intra_op_num_threads = threads
    fused = ort.InferenceSession(str(served_file), plain, providers=["CPUExecutionProvider"])
    print("\nchoices, timed side by side (medians):")
    for batch in (1, 32):
        requests = [texts[i : i + batch] for i in range(0, len(texts) - batch + 1, batch)]
        batching = {"max_length": length, "batch_size": size}
        runs = {
            "apart": partial(session_logits, session, tokenizer, **batching),
            "fused": partial(session_logits, fused, tokenizer, **batching),
        }
        calls = 200 if batch == 1 else 30
        m = medians(interleaved(cycled(runs, requests), calls, 25 if batch == 1 else 5, 3))
        print(
            f"  batch {batch:>2}: SkipLayerNormalization fused {m['fused']:7.2f} ms, left "
            f"apart {m['apart']:7.2f} ms: fused takes {m['fused'] / m['apart']:.2f}x"
        )
    requests = [texts[i : i + 32] for i in range(0, len(texts) - 31, 32)]

    def padded(run):
        return lambda b: run(
            tokenizer(b, padding=True, truncation=True, max_length=length, return_tensors="np")
        )

    def grouped(run):
        return lambda b: [run(a) for _, a in length_grouped(tokenizer, b, length, size)]

    @torch.inference_mode()
    def torch_run(arrays):
        return torch_model(**{k: torch.from_numpy(v) for k, v in arrays.items()}).logits

    def onnx_run(arrays):
        return session.run(["logits"], session_feed(session, arrays))

    runs = {
        "onnx padded": padded(onnx_run),
        "onnx by length": grouped(onnx_run),
        "torch padded": padded(torch_run),
        "torch by length": grouped(torch_run),
    }
    m = medians(interleaved(cycled(runs, requests), 30, 5, 2))
    print("  batch 32 with tokenization, texts/s:")
    for engine in ("onnx", "torch"):
        a, b = m[f"{engine} padded"], m[f"{engine} by length"]
        print(f"    {engine:<6} padded {32e3 / a:6.0f}, by length {32e3 / b:6.0f} = {a / b:.2f}x")
    print(
        f"    served (onnx by length) / torch given the same batching: "
        f"{m['torch by length'] / m['onnx by length']:.2f}x"
    )


def print_physical_limit(model, tokenizer, texts, timings, engines, config) -> None:
    """FLOPs per token at the test split's mean length, and the share of the CPU's peak that
    each engine's batch-32 throughput reaches."""
    lengths = [
        len(ids)
        for ids in tokenizer(list(texts), truncation=True, max_length=config.data.max_length)[
            "input_ids"
        ]
    ]
    mean_len = sum(lengths) / len(lengths)
    per_token = flops_per_token(model, mean_len)
    peak = peak_flops()
    print(
        f"\nphysical limit: {per_token / 1e6:.1f} MFLOP per token (forward, mean length "
        f"{mean_len:.0f}); this CPU: {peak.cores} cores at {peak.clock_text}, dense peak "
        f"fp32 {fmt_flops(peak.fp32)}, bf16 {fmt_flops(peak.bf16)}, int8 {fmt_flops(peak.int8)}"
    )
    for engine in engines:
        achieved = timings[f"serve/{engine}.batch32_per_second"] * mean_len * per_token
        shares = ", ".join(
            f"{share:.1%} of {p} peak"
            for p in ("fp32", "bf16", "int8")
            if (share := peak.share(achieved, p)) is not None
        )
        print(f"  {engine:<12} batch 32: {fmt_flops(achieved)}  ({shares})")


if __name__ == "__main__":
    main()
