"""Stage 8: register the served model, check it through `mlflow models serve`, move aliases.

Order: log the pyfunc model, register a version, serve that version in a separate process and
require the same answers as in-process (else the version is deleted and the run fails), tag
every gate on the version, set `challenger`, and move `production` only when every gate passed
and the candidate is not worse than production beyond the tolerance (paired bootstrap CI).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, Schema
from prefect.artifacts import create_markdown_artifact
from prefect.context import FlowRunContext

from tasks.champion import Comparison, paired_bootstrap
from tasks.config import PipelineConfig
from tasks.errors import GateFailed
from tasks.evaluate import Evaluation, load_test_split
from tasks.gates import Gate, evaluate_gate
from tasks.latency import latency_ms
from tasks.prepare_data import PreparedData
from tasks.quantize import SERVED_FILE, QuantizedModel
from tasks.registry import CHALLENGER, ensure_registered_model, move_production
from tasks.serve_check import ServeReport
from tasks.served_model import invoke, mlflow_models_serve
from tasks.stage import stage_task
from tasks.storage import stage_dir
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

SERVING_CODE = Path(__file__).resolve().parent / "serving" / "onnx_text_classifier.py"
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


def build_serving_folder(
    config: PipelineConfig, data: PreparedData, quantized: QuantizedModel, run_id: str
) -> Path:
    """The served ONNX model, its tokenizer and serving.json (labels, file, max length)."""
    src = quantized.model.fetch()
    out_dir = stage_dir(config, run_id, "serving_model")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    for item in src.iterdir():
        if item.is_file() and (item.suffix != ".onnx" or item.name == SERVED_FILE):
            shutil.copy2(item, out_dir / item.name)
    spec = {
        "label_names": data.label_names,
        "model_file": SERVED_FILE,
        "max_length": config.data.max_length,
        # dynamic int8 scales depend on the batch: serve with the batching the gates measured
        "batch_size": config.eval.batch_size,
        "variant": quantized.variant,
        "device": "cuda" if config.serve.device == "cuda" else "cpu",
    }
    (out_dir / "serving.json").write_text(json.dumps(spec, indent=2))
    return out_dir


def champion_comparison(
    config: PipelineConfig, data: PreparedData, candidate: ServeReport, evaluation: Evaluation
) -> tuple[Gate | None, Comparison | None]:
    """Paired bootstrap of candidate minus production; gate on the CI's lower bound."""
    if evaluation.production_predictions is None:
        return None, None
    registry = config.registry
    comparison = paired_bootstrap(
        registry.metric,
        evaluation.labels,
        candidate.predictions,
        evaluation.production_predictions,
        len(data.label_names),
        registry.bootstrap_samples,
        registry.confidence,
    )
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


def log_serving_model(serving_dir: Path, run_id: str) -> str:
    """Log the pyfunc model (code + artifacts, no pickle) to the run; returns its URI."""
    signature = ModelSignature(inputs=Schema([ColSpec("string", "text")]))
    with active_run(run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(SERVING_CODE),
            artifacts={"model_dir": str(serving_dir)},
            signature=signature,
            input_example=pd.DataFrame({"text": ["my card was charged twice"]}),
            pip_requirements=SERVING_REQUIREMENTS,
        )
    return info.model_uri


def served_model_check(
    config: PipelineConfig, data: PreparedData, serve: ServeReport, model_uri: str, run_id: str
) -> Gate:
    """Serve model_uri with `mlflow models serve`, send the golden set, compare, time requests."""
    texts = list(load_test_split(data)["text"])[: config.serve.golden_requests]
    expected = [data.label_names[i] for i in serve.predictions[: len(texts)]]
    with mlflow_models_serve(
        model_uri, tracking_uri(config.tracking), config.serve.served_start_timeout_s
    ) as url:
        start = time.perf_counter()
        answers = invoke(url, texts)
        batch_ms = (time.perf_counter() - start) * 1000
        single = latency_ms(
            lambda t: invoke(url, [t]), texts, warmup=2, runs=min(20, config.serve.latency_runs)
        )
    got = [a["label"] for a in answers]
    mismatches = sum(a != b for a, b in zip(got, expected, strict=False)) + abs(
        len(got) - len(expected)
    )
    probabilities_ok = all(abs(sum(a["probabilities"].values()) - 1.0) < 1e-4 for a in answers)
    log_metrics(
        run_id,
        {
            "served_model.request_p50_ms": single["p50_ms"],
            "served_model.request_p95_ms": single["p95_ms"],
            f"served_model.batch{len(texts)}_request_ms": batch_ms,
            "served_model.golden_requests": len(texts),
        },
    )
    value = mismatches if probabilities_ok else float(len(texts))
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
        model_uri = log_serving_model(serving_dir, run_id)
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
        "candidate_adapter_metrics": {k: evaluation.metrics[k] for k in ("accuracy", "macro_f1")},
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
    t = serve.timings
    markdown = (
        f"# {result.model_name} v{result.version}\n\n"
        f"**Production moved:** {'yes' if result.promoted else 'no'} ({result.reason})\n"
        f"{comparison}\n"
        f"Served: {quantized.variant} on {serve.provider}; "
        f"accuracy {serve.metrics['accuracy']:.4f}, macro-F1 {serve.metrics['macro_f1']:.4f}; "
        f"batch-1 p50 {t['serve.onnx.batch1_p50_ms']:.2f} ms "
        f"(PyTorch {t['serve.torch.batch1_p50_ms']:.2f} ms)\n\n"
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
