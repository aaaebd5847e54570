"""The served-model check: the registered version, started with `mlflow models serve`, must
answer the golden set exactly as the served model answered in-process."""

from __future__ import annotations

import time

from tasks.common.faults import kill_point
from tasks.common.gates import Gate
from tasks.common.latency import latency_ms
from tasks.common.served_model import invoke_records, mlflow_models_serve
from tasks.common.stage import StageContext
from tasks.records import GoldenSet


def mismatches(answers: list[dict], golden: GoldenSet) -> float:
    """Answers that differ from the expected ones (all of them if any is malformed)."""
    if not all(golden.well_formed(a) for a in answers):
        return float(len(golden.records))
    got = [a[golden.answer_key] for a in answers]
    differing = sum(a != b for a, b in zip(got, golden.expected, strict=False))
    return differing + abs(len(got) - len(golden.expected))


def served_model_check(stage: StageContext, golden: GoldenSet, model_uri: str) -> Gate:
    """Serve model_uri, send the golden set, compare, time single requests; log the gate."""
    config = stage.config
    with mlflow_models_serve(
        model_uri, stage.run.tracking.uri, config.serve.served_start_timeout_s
    ) as url:
        kill_point("register:serving")
        start = time.perf_counter()
        answers = invoke_records(url, golden.records)
        batch_ms = (time.perf_counter() - start) * 1000
        single = latency_ms(
            lambda r: invoke_records(url, [r]),
            golden.records,
            warmup=2,
            runs=min(20, config.serve.latency_runs),
        )
    stage.run.log_metrics(
        {
            "serve/http.request_p50_ms": single["p50_ms"],
            "serve/http.request_p95_ms": single["p95_ms"],
            f"serve/http.batch{len(golden.records)}_request_ms": batch_ms,
            "serve/http.golden_requests": len(golden.records),
        }
    )
    return stage.gate("served_model_prediction_mismatches", mismatches(answers, golden), 0, "<=")
