"""Stage 8: register the served model, tag it with every gate, and move the aliases.

`challenger` always points at the new version; `production` moves only when every gate
passed and the candidate is at least as good as the current holder (within tolerance).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, Schema
from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext

from tasks.config import PipelineConfig
from tasks.errors import retry_unless_user_error
from tasks.evaluate import Evaluation
from tasks.gates import Gate, evaluate_gate
from tasks.prepare_data import PreparedData
from tasks.quantize import QUANTIZED_FILE, QuantizedModel
from tasks.registry import CHALLENGER, PRODUCTION, ensure_registered_model, version_by_alias
from tasks.serve_check import ServeReport
from tasks.tracking import active_run, connect, log_gate, log_json, stage_timer

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


def build_serving_folder(
    config: PipelineConfig, data: PreparedData, quantized: QuantizedModel, run_id: str
) -> Path:
    """The quantized model, its tokenizer and serving.json (labels, file, max length)."""
    src = quantized.model.fetch()
    out_dir = Path(config.output_dir) / run_id / "serving_model"
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    for item in src.iterdir():
        if item.is_file() and (item.suffix != ".onnx" or item.name == QUANTIZED_FILE):
            shutil.copy2(item, out_dir / item.name)
    spec = {
        "label_names": data.label_names,
        "model_file": QUANTIZED_FILE,
        "max_length": config.data.max_length,
        "device": "cuda" if config.serve.device == "cuda" else "cpu",
    }
    (out_dir / "serving.json").write_text(json.dumps(spec, indent=2))
    return out_dir


def champion_gate(
    config: PipelineConfig, candidate: ServeReport, evaluation: Evaluation
) -> Gate | None:
    """Candidate's served metric minus production's on the same test split (None: no holder)."""
    if evaluation.production_metrics is None:
        return None
    metric = config.registry.metric
    delta = candidate.metrics[metric] - evaluation.production_metrics[metric]
    return evaluate_gate(f"champion_{metric}_delta", delta, 0.0 - config.registry.tolerance, ">=")


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


def log_serving_model(config: PipelineConfig, serving_dir: Path, run_id: str) -> str:
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


def register(
    config: PipelineConfig,
    data: PreparedData,
    evaluation: Evaluation,
    quantized: QuantizedModel,
    serve: ServeReport,
    gates: list[Gate],
    run_id: str,
) -> Registration:
    """Register the model, tag gates, set challenger, maybe move production; log a report."""
    client, _ = connect(config.tracking)
    name = config.registry.model_name
    with stage_timer(run_id, "register"):
        serving_dir = build_serving_folder(config, data, quantized, run_id)
        model_uri = log_serving_model(config, serving_dir, run_id)
        champion = champion_gate(config, serve, evaluation)
        if champion is not None:
            log_gate(run_id, champion)
        all_gates = [*gates, *([champion] if champion else [])]
        promote, reason = decide(config, gates, champion)
        ensure_registered_model(client, name)
        version = mlflow.register_model(model_uri, name, await_registration_for=300).version
        previous = version_by_alias(client, name, PRODUCTION)
        try:
            tags = {
                f"gate.{g.name}": f"{'passed' if g.passed else 'failed'} ({g.value:.6g} "
                f"{g.comparison} {g.threshold:.6g})"
                for g in all_gates
            }
            tags |= {f"served.{k}": f"{v:.4f}" for k, v in serve.metrics.items()}
            tags |= {
                "run_id": run_id,
                "serve.provider": serve.provider,
                "data.content_sha256": data.content_sha256,
                "promotion": reason,
            }
            for key, value in tags.items():
                client.set_model_version_tag(name, version, key, value)
            client.set_registered_model_alias(name, CHALLENGER, version)
            if promote:
                if previous is not None:
                    client.set_model_version_tag(
                        name, version, "previous_production", str(previous.version)
                    )
                client.set_registered_model_alias(name, PRODUCTION, version)
        except Exception:
            client.delete_model_version(name, version)  # leave nothing half-written behind
            raise
        result = Registration(
            model_name=name,
            version=str(version),
            model_uri=f"models:/{name}/{version}",
            promoted=promote,
            reason=reason,
            previous_production=str(previous.version) if previous else None,
            gates=all_gates,
        )
        _report(run_id, result, serve, evaluation)
    return result


def _report(run_id: str, result: Registration, serve: ServeReport, evaluation: Evaluation) -> None:
    """Promotion report as JSON and Markdown in MLflow, and as a Prefect artifact."""
    report = asdict(result) | {
        "candidate_served_metrics": serve.metrics,
        "candidate_adapter_metrics": {k: evaluation.metrics[k] for k in ("accuracy", "macro_f1")},
        "production_metrics": evaluation.production_metrics,
        "timings": serve.timings,
    }
    log_json(run_id, report, "promotion/report.json")
    rows = "\n".join(
        f"| {g.name} | {g.value:.6g} | {g.comparison} {g.threshold:.6g} | "
        f"{'pass' if g.passed else 'FAIL'} |"
        for g in result.gates
    )
    markdown = (
        f"# {result.model_name} v{result.version}\n\n"
        f"**Production moved:** {'yes' if result.promoted else 'no'} ({result.reason})\n\n"
        f"| gate | value | required | result |\n|---|---|---|---|\n{rows}\n"
    )
    MlflowClient().log_text(run_id, markdown, "promotion/report.md")
    if FlowRunContext.get() is not None:  # outside a Prefect run there is nowhere to show it
        create_markdown_artifact(
            markdown=markdown,
            key="promotion-report",
            description=f"{result.model_name} v{result.version}",
        )


@task(
    name="register",
    retries=2,
    retry_delay_seconds=5,
    cache_policy=NO_CACHE,
    retry_condition_fn=retry_unless_user_error,
)
def register_task(
    config: PipelineConfig,
    data: PreparedData,
    evaluation: Evaluation,
    quantized: QuantizedModel,
    serve: ServeReport,
    gates: list[Gate],
    run_id: str,
) -> Registration:
    """Prefect wrapper around register."""
    return register(config, data, evaluation, quantized, serve, gates, run_id)
