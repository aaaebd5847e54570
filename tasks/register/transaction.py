"""The register stage: log the served model, register a version, check it, move aliases.

Order: log the pyfunc model, register a version, serve that version in a separate process and
require the same answers as in-process (else the version is deleted and the run fails), tag
every gate on the version, set `challenger`, and move `production` only when every gate passed
and the candidate is not worse than production beyond the tolerance (paired bootstrap CI).
"""

from __future__ import annotations

from pathlib import Path

import mlflow
from mlflow.entities.model_registry import ModelVersion

from tasks.common.champion import Comparison
from tasks.common.errors import GateFailed
from tasks.common.gates import Gate
from tasks.common.registry import CHALLENGER, ensure_registered_model, move_production
from tasks.common.serving import build_serving_folder, serving_spec
from tasks.common.stage import StageContext
from tasks.interface import TaskKind
from tasks.records import Evaluation, PreparedData, QuantizedModel, Registration, ServeReport
from tasks.register.decision import champion_gate, decide
from tasks.register.report import write_report
from tasks.register.served_check import served_model_check


def log_serving_model(stage: StageContext, kind: TaskKind, data, quantized) -> tuple[str, Path]:
    """Build the serving folder and log it as a pyfunc model (code + artifacts, no pickle);
    returns the model's URI and the folder."""
    config = stage.config
    serving_dir = build_serving_folder(
        stage.fetch(quantized.model),
        stage.stage_dir("serving_model"),
        serving_spec(config, quantized.variant, kind.serving_spec(stage, data)),
    )
    signature, example, requirements = kind.signature(config)
    with stage.run.active():
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(kind.SERVING_CODE),
            artifacts={"model_dir": str(serving_dir)},
            signature=signature,
            input_example=example,
            pip_requirements=requirements,
        )
    return info.model_uri, serving_dir


def _log_champion(stage: StageContext, champion: Gate | None, comparison: Comparison | None):
    if champion is None:
        return
    stage.run.log_gate(champion)
    stage.run.log_metrics(
        {
            f"champion.{comparison.metric}_delta": comparison.delta,
            f"champion.{comparison.metric}_delta_ci_low": comparison.low,
            f"champion.{comparison.metric}_delta_ci_high": comparison.high,
        }
    )


def version_tags(stage, gates, served, quantized, data) -> dict[str, str]:
    tags = {
        f"gate.{g.name}": f"{'passed' if g.passed else 'failed'} ({g.value:.6g} "
        f"{g.comparison} {g.threshold:.6g})"
        for g in gates
    }
    tags |= {f"served.{k}": f"{v:.4f}" for k, v in served.metrics.items()}
    return tags | {
        "run_id": stage.run_id,
        "task": stage.config.task,
        "serve.provider": served.provider,
        "onnx.variant": quantized.variant,
        "data.content_sha256": data.content_sha256,
    }


def _finish_version(
    stage, kind, data, served, quantized, gates, champion, version, serving_dir
) -> tuple:
    """Served-model check, gate tags, challenger, maybe production; returns (promote, reason,
    previous production, all gates). Raises GateFailed when the served check fails."""
    config, client = stage.config, stage.run.client
    name = config.registry.model_name
    checked = list(gates)
    if config.serve.served_model_check:
        golden = kind.golden_set(stage, data, served, serving_dir)
        served_gate = served_model_check(stage, golden, f"models:/{name}/{version}")
        checked.append(served_gate)
        if not served_gate.passed:
            raise GateFailed(served_gate)
    all_gates = [*checked, *([champion] if champion else [])]
    promote, reason = decide(config.registry, checked, champion)
    for key, value in version_tags(stage, all_gates, served, quantized, data).items():
        client.set_model_version_tag(name, version, key, value)
    client.set_registered_model_alias(name, CHALLENGER, version)
    previous = move_production(client, name, version, reason) if promote else None
    # written last: a version without "decision" is half-written (see the resume check)
    client.set_model_version_tag(name, version, "promoted", str(promote).lower())
    client.set_model_version_tag(name, version, "decision", reason[:5000])
    stage.run.set_tags({"registry.version": version, "registry.promoted": str(promote)})
    return promote, reason, previous, all_gates


def register(
    stage: StageContext,
    kind: TaskKind,
    data: PreparedData,
    evaluation: Evaluation,
    quantized: QuantizedModel,
    served: ServeReport,
    gates: list[Gate],
) -> Registration:
    """Register, check the served version, tag gates, set challenger, maybe move production."""
    config, client = stage.config, stage.run.client
    name = config.registry.model_name
    model_uri, serving_dir = log_serving_model(stage, kind, data, quantized)
    comparison = kind.compare(stage, data, served, evaluation)
    champion = champion_gate(config.registry, comparison)
    _log_champion(stage, champion, comparison)
    ensure_registered_model(client, name, kind.DESCRIPTION)
    for earlier in client.search_model_versions(f"name='{name}' and run_id='{stage.run_id}'"):
        if "decision" not in earlier.tags:  # half-written by an interrupted attempt
            client.delete_model_version(name, earlier.version)
            continue
        return already_registered(earlier, [*gates, *([champion] if champion else [])], comparison)
    with stage.run.tracking.fluent():
        version = str(mlflow.register_model(model_uri, name, await_registration_for=300).version)
    try:
        promote, reason, previous, all_gates = _finish_version(
            stage, kind, data, served, quantized, gates, champion, version, serving_dir
        )
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
    write_report(stage.run, result, served, evaluation, quantized, kind.summary(served))
    return result


def already_registered(version: ModelVersion, gates: list[Gate], comparison) -> Registration:
    """A resumed run whose version was already registered and decided: no duplicate."""
    return Registration(
        model_name=version.name,
        version=str(version.version),
        model_uri=f"models:/{version.name}/{version.version}",
        promoted=version.tags.get("promoted") == "true",
        reason=version.tags["decision"],
        previous_production=version.tags.get("previous_production"),
        gates=gates,
        comparison=comparison,
    )
