"""Stage 8: register the served model, check it through `mlflow models serve`, move aliases.

Order: log the pyfunc model, register a version, serve that version in a separate process and
require the same answers as in-process (else the version is deleted and the run fails), tag
every gate on the version, set `challenger`, and move `production` only when every gate passed
and the candidate is not worse than production beyond the tolerance (paired bootstrap CI).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from mlflow.types.schema import Array, Object, Property
from prefect.artifacts import create_markdown_artifact
from prefect.context import FlowRunContext

from tasks.champion import Comparison, paired_bootstrap, paired_bootstrap_scores
from tasks.config import PipelineConfig
from tasks.errors import GateFailed
from tasks.evaluate import Evaluation, load_test_split
from tasks.gates import Gate, evaluate_gate
from tasks.latency import latency_ms
from tasks.prepare_data import PreparedData
from tasks.quantize import QuantizedModel
from tasks.registry import CHALLENGER, ensure_registered_model, move_production
from tasks.serve_check import ServeReport
from tasks.served_model import invoke_records, mlflow_models_serve
from tasks.serving_folder import SERVING_CODE, build_serving_folder
from tasks.stage import stage_task
from tasks.tracking import (
    active_run,
    connect,
    log_gate,
    log_json,
    log_metrics,
    set_tags,
    stage_timer,
    tracking_uri,
)

SERVING_REQUIREMENTS = ["onnxruntime", "transformers", "tokenizers", "numpy", "pandas"]


@dataclass(frozen=True)
class Registration:
    """The registered version, the decision about production, and why."""

    model_name: str
    version: str
    model_uri: str
    promoted: bool
    reason: str
    previous_production: str | None
    gates: list[Gate]
    comparison: Comparison | None = None


def champion_comparison(
    config: PipelineConfig, data: PreparedData, candidate: ServeReport, evaluation: Evaluation
) -> tuple[Gate | None, Comparison | None]:
    """Paired bootstrap of candidate minus production; gate on the CI's lower bound.

    The candidate is the served model (its answers from serve_check); causal_lm compares
    per-prompt scores (registry.metric), classification recomputes the metric per resample.
    """
    registry = config.registry
    if evaluation.production_scores is not None:
        comparison = paired_bootstrap_scores(
            registry.metric,
            candidate.scores,
            evaluation.production_scores,
            registry.bootstrap_samples,
            registry.confidence,
        )
    elif evaluation.production_predictions is not None:
        comparison = paired_bootstrap(
            registry.metric,
            evaluation.labels,
            candidate.predictions,
            evaluation.production_predictions,
            len(data.label_names),
            registry.bootstrap_samples,
            registry.confidence,
        )
    else:
        return None, None
    gate = evaluate_gate(
        f"champion_{registry.metric}_delta_ci_low", comparison.low, 0.0 - registry.tolerance, ">="
    )
    return gate, comparison


def decide(config: PipelineConfig, gates: list[Gate], champion: Gate | None) -> tuple[bool, str]:
    failed = [g.name for g in gates if not g.passed]
    if failed:
        return False, f"gates failed: {', '.join(failed)}"
    if champion is not None and not champion.passed:
        return False, f"candidate trails production: {champion.describe()}"
    if not config.registry.promote:
        return False, "registry.promote is false"
    if champion is None:
        return True, "no production model yet; every gate passed"
    return True, f"every gate passed; {champion.describe()}"


def serving_interface(config: PipelineConfig) -> tuple[ModelSignature, pd.DataFrame, list[str]]:
    """The pyfunc's signature, input example and pip requirements for the task."""
    if config.task == "causal_lm":
        messages = Array(Object([Property("role", "string"), Property("content", "string")]))
        signature = ModelSignature(
            inputs=Schema(
                [
                    ColSpec(messages, "messages", required=False),
                    ColSpec("string", "prompt", required=False),
                ]
            ),
            params=ParamSchema([ParamSpec("max_new_tokens", "long", config.eval.max_new_tokens)]),
        )
        example = pd.DataFrame({"prompt": ["My card was charged twice. Which team handles it?"]})
        return signature, example, [*SERVING_REQUIREMENTS, "optimum", "optimum-onnx", "torch"]
    signature = ModelSignature(inputs=Schema([ColSpec("string", "text")]))
    return signature, pd.DataFrame({"text": ["my card was charged twice"]}), SERVING_REQUIREMENTS


def log_serving_model(config: PipelineConfig, serving_dir: Path, run_id: str) -> str:
    """Log the pyfunc model (code + artifacts, no pickle) to the run; returns its URI."""
    signature, example, requirements = serving_interface(config)
    with active_run(run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(SERVING_CODE[config.task]),
            artifacts={"model_dir": str(serving_dir)},
            signature=signature,
            input_example=example,
            pip_requirements=requirements,
        )
    return info.model_uri


def golden_set(
    config: PipelineConfig, data: PreparedData, serve: ServeReport
) -> tuple[list[dict], list, str]:
    """(request records, answers expected from in-process serving, answer field) for the check."""
    n = config.serve.golden_requests
    if config.task == "causal_lm":
        from tasks.causal.evaluate import eval_prompts  # imported here: it imports this module

        messages = list(eval_prompts(config, data)["messages"])[: min(n, len(serve.answers))]
        records = [{"messages": json.loads(m)} for m in messages]
        return records, serve.answers[: len(messages)], "text"
    texts = list(load_test_split(data)["text"])[:n]
    expected = [data.label_names[i] for i in serve.predictions[: len(texts)]]
    return [{"text": t} for t in texts], expected, "label"


def served_model_check(
    config: PipelineConfig, data: PreparedData, serve: ServeReport, model_uri: str, run_id: str
) -> Gate:
    """Serve model_uri with `mlflow models serve`, send the golden set, compare, time requests."""
    records, expected, answer_key = golden_set(config, data, serve)
    with mlflow_models_serve(
        model_uri, tracking_uri(config.tracking), config.serve.served_start_timeout_s
    ) as url:
        start = time.perf_counter()
        answers = invoke_records(url, records)
        batch_ms = (time.perf_counter() - start) * 1000
        single = latency_ms(
            lambda r: invoke_records(url, [r]),
            records,
            warmup=2,
            runs=min(20, config.serve.latency_runs),
        )
    got = [a[answer_key] for a in answers]
    mismatches = sum(a != b for a, b in zip(got, expected, strict=False)) + abs(
        len(got) - len(expected)
    )
    log_metrics(
        run_id,
        {
            "served_model.request_p50_ms": single["p50_ms"],
            "served_model.request_p95_ms": single["p95_ms"],
            f"served_model.batch{len(records)}_request_ms": batch_ms,
            "served_model.golden_requests": len(records),
        },
    )
    well_formed = config.task == "causal_lm" or all(
        abs(sum(a["probabilities"].values()) - 1.0) < 1e-4 for a in answers
    )
    value = mismatches if well_formed else float(len(records))
    return log_gate(run_id, evaluate_gate("served_model_prediction_mismatches", value, 0, "<="))


def register(
    config: PipelineConfig,
    data: PreparedData,
    evaluation: Evaluation,
    quantized: QuantizedModel,
    serve: ServeReport,
    gates: list[Gate],
    run_id: str,
) -> Registration:
    """Register, check the served version, tag gates, set challenger, maybe move production."""
    client, _ = connect(config.tracking)
    name = config.registry.model_name
    with stage_timer(run_id, "register"):
        serving_dir = build_serving_folder(config, data, quantized, run_id)
        model_uri = log_serving_model(config, serving_dir, run_id)
        champion, comparison = champion_comparison(config, data, serve, evaluation)
        if champion is not None:
            log_gate(run_id, champion)
            log_metrics(
                run_id,
                {
                    f"champion.{comparison.metric}_delta": comparison.delta,
                    f"champion.{comparison.metric}_delta_ci_low": comparison.low,
                    f"champion.{comparison.metric}_delta_ci_high": comparison.high,
                },
            )
        ensure_registered_model(client, name)
        for earlier in client.search_model_versions(f"name='{name}' and run_id='{run_id}'"):
            if "decision" not in earlier.tags:  # half-written by an interrupted attempt
                client.delete_model_version(name, earlier.version)
                continue
            return _already_registered(earlier, all_gates_of(gates, champion), comparison)
        version = str(mlflow.register_model(model_uri, name, await_registration_for=300).version)
        try:
            checked = list(gates)
            if config.serve.served_model_check:
                served_gate = served_model_check(
                    config, data, serve, f"models:/{name}/{version}", run_id
                )
                checked.append(served_gate)
                if not served_gate.passed:
                    raise GateFailed(served_gate)
            all_gates = [*checked, *([champion] if champion else [])]
            promote, reason = decide(config, checked, champion)
            tags = {
                f"gate.{g.name}": f"{'passed' if g.passed else 'failed'} ({g.value:.6g} "
                f"{g.comparison} {g.threshold:.6g})"
                for g in all_gates
            }
            tags |= {f"served.{k}": f"{v:.4f}" for k, v in serve.metrics.items()}
            tags |= {
                "run_id": run_id,
                "task": config.task,
                "serve.provider": serve.provider,
                "onnx.variant": quantized.variant,
                "data.content_sha256": data.content_sha256,
            }
            for key, value in tags.items():
                client.set_model_version_tag(name, version, key, value)
            client.set_registered_model_alias(name, CHALLENGER, version)
            previous = move_production(client, name, version, reason) if promote else None
            # written last: a version without "decision" is half-written (see the resume check)
            client.set_model_version_tag(name, version, "promoted", str(promote).lower())
            client.set_model_version_tag(name, version, "decision", reason[:5000])
            set_tags(run_id, {"registry.version": version, "registry.promoted": str(promote)})
        except BaseException:
            client.delete_model_version(name, version)  # leave nothing half-written behind
            raise
        result = Registration(
            model_name=name,
            version=version,
            model_uri=f"models:/{name}/{version}",
            promoted=promote,
            reason=reason,
            previous_production=previous,
            gates=all_gates,
            comparison=comparison,
        )
        _report(run_id, result, serve, evaluation, quantized)
    return result


def all_gates_of(gates: list[Gate], champion: Gate | None) -> list[Gate]:
    return [*gates, *([champion] if champion else [])]


def _already_registered(version, gates: list[Gate], comparison) -> Registration:
    """A resumed run whose version was already registered and decided: no duplicate."""
    reason = version.tags["decision"]
    return Registration(
        model_name=version.name,
        version=str(version.version),
        model_uri=f"models:/{version.name}/{version.version}",
        promoted=not reason.startswith(("gates failed", "candidate trails", "registry.promote")),
        reason=reason,
        previous_production=version.tags.get("previous_production"),
        gates=gates,
        comparison=comparison,
    )


def served_summary(serve: ServeReport) -> str:
    """One line of the served model's scores and speed against PyTorch."""
    m, t = serve.metrics, serve.timings
    if "rouge_l" in m:
        return (
            f"ROUGE-L {m['rouge_l']:.4f}, exact match {m['exact_match']:.4f}; time to first "
            f"token p50 {t['serve.onnx.ttft_p50_ms']:.2f} ms (PyTorch "
            f"{t['serve.torch.ttft_p50_ms']:.2f} ms), {t['serve.onnx.tokens_per_second']:.1f} "
            f"tokens/s (PyTorch {t['serve.torch.tokens_per_second']:.1f})"
        )
    return (
        f"accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f}; batch-1 p50 "
        f"{t['serve.onnx.batch1_p50_ms']:.2f} ms (PyTorch {t['serve.torch.batch1_p50_ms']:.2f} ms)"
    )


def _report(
    run_id: str,
    result: Registration,
    serve: ServeReport,
    evaluation: Evaluation,
    quantized: QuantizedModel,
) -> None:
    """Promotion report as JSON and Markdown in MLflow, and as a Prefect artifact."""
    report = asdict(result) | {
        "candidate_served_metrics": serve.metrics,
        "candidate_adapter_metrics": evaluation.metrics,
        "production_version": evaluation.production_version,
        "production_metrics": evaluation.production_metrics,
        "onnx_variant": quantized.variant,
        "onnx_variant_reason": quantized.reason,
        "provider": serve.provider,
        "timings": serve.timings,
    }
    log_json(run_id, report, "promotion/report.json")
    rows = "\n".join(
        f"| {g.name} | {g.value:.6g} | {g.comparison} {g.threshold:.6g} | "
        f"{'pass' if g.passed else 'FAIL'} |"
        for g in result.gates
    )
    comparison = ""
    if result.comparison is not None:
        c = result.comparison
        comparison = (
            f"\nCandidate minus production v{evaluation.production_version} ({c.metric}): "
            f"{c.delta:+.4f}, {c.confidence:.0%} CI [{c.low:+.4f}, {c.high:+.4f}]\n"
        )
    markdown = (
        f"# {result.model_name} v{result.version}\n\n"
        f"**Production moved:** {'yes' if result.promoted else 'no'} ({result.reason})\n"
        f"{comparison}\n"
        f"Served: {quantized.variant} on {serve.provider}; {served_summary(serve)}\n\n"
        f"| gate | value | required | result |\n|---|---|---|---|\n{rows}\n"
    )
    MlflowClient().log_text(run_id, markdown, "promotion/report.md")
    if FlowRunContext.get() is not None:  # outside a Prefect run there is nowhere to show it
        create_markdown_artifact(
            markdown=markdown,
            key="promotion-report",
            description=f"{result.model_name} v{result.version}",
        )


register_task = stage_task(register, name="register", retries=2)
