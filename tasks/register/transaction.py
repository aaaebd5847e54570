"""The register stage: log the served model, register a version, check it, record its gates,
move aliases. Every step can be interrupted (SIGKILL) and resumed.

1. log the pyfunc model (code + artifacts, no pickle) and register a version, tagged
   registration=pending;
2. serve that version with `mlflow models serve` and require the in-process answers (else the
   version is deleted and the run fails);
3. write the gate record (a tag per gate, then gates.record: the mark of a complete record),
   the decision and registration=decided;
4. set `challenger`; move `production` when the decision says so and production is still the
   version the candidate was compared with; registration=complete.

A re-run of the same MLflow run finds its version: a pending one (no gate record, so no alias:
aliases come after the record) is deleted and registered again; a decided one is finished from
step 4, so no second version is registered and no alias is lost.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
from mlflow.entities.model_registry import ModelVersion

from tasks.common.champion import Comparison
from tasks.common.errors import GateFailed
from tasks.common.faults import kill_point
from tasks.common.gates import Gate
from tasks.common.quantization import fp32_nodes_tag, smoothed_nodes_tag
from tasks.common.registry import (
    CHALLENGER,
    PRODUCTION,
    create_version,
    delete_unfinished,
    ensure_registered_model,
    gate_record,
    has_complete_record,
    move_production,
    version_by_alias,
    write_gate_record,
)
from tasks.common.serving import build_serving_folder, serving_spec
from tasks.common.stage import StageContext
from tasks.interface import TaskKind
from tasks.records import Evaluation, PreparedData, QuantizedModel, Registration, ServeReport
from tasks.register.decision import champion_gate, decide
from tasks.register.model_card import CARD_FILE, CardFacts, model_card
from tasks.register.report import search_tags, write_report
from tasks.register.served_check import served_model_check

STATE_TAG = "registration"
PENDING, DECIDED, COMPLETE = "pending", "decided", "complete"
COMPARED_TAG = "compared_with_production"  # the production version the decision was made against


def log_serving_model(stage: StageContext, kind: TaskKind, facts: dict) -> tuple[str, Path]:
    """Build the serving folder and log it as a pyfunc model (code + artifacts, no pickle)
    with its model card (README.md at the model's root); returns the model's URI and the
    folder. `facts`: CardFacts' fields but spec and example (data, evaluation, quantized,
    served, interval, gates)."""
    config, quantized = stage.config, facts["quantized"]
    spec = kind.serving_spec(stage, facts["data"])
    serving_dir = build_serving_folder(
        stage.fetch(quantized.model),
        stage.stage_dir("serving_model"),
        serving_spec(config, quantized.variant, spec),
    )
    signature, example, requirements = kind.signature(config)
    card = model_card(
        config, stage.run_id, kind.DESCRIPTION, CardFacts(**facts, spec=spec, example=example)
    )
    with stage.run.active():
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(kind.SERVING_CODE),
            artifacts={"model_dir": str(serving_dir)},
            signature=signature,
            input_example=example,
            pip_requirements=requirements,
        )
    card_path = stage.stage_dir("model_card") / CARD_FILE
    card_path.write_text(card)
    stage.run.client.log_model_artifact(info.model_id, str(card_path))
    return info.model_uri, serving_dir


def version_tags(stage, served: ServeReport, quantized: QuantizedModel, data) -> dict[str, str]:
    tags = {f"served.{k}": f"{v:.4f}" for k, v in served.metrics.items()}
    chosen = next((c for c in quantized.candidates if c.name == quantized.variant), None)
    return (
        tags
        | {
            "run_id": stage.run_id,
            "task": stage.config.task,
            "serve.provider": served.provider,
            "onnx.variant": quantized.variant,
            # the served graph's nodes left in fp32 and why (the head, a mixed-precision search)
            "quantize.fp32_nodes": fp32_nodes_tag(chosen)[:5000] if chosen else "every node",
            "quantize.smoothed_nodes": smoothed_nodes_tag(chosen)[:5000] if chosen else "none",
            "data.content_sha256": data.content_sha256,
        }
        | search_tags(stage.run)
    )


def earlier_version(stage: StageContext, name: str) -> ModelVersion | None:
    """This run's decided version, after deleting any pending one (an interrupted attempt)."""
    client = stage.run.client
    for version in client.search_model_versions(f"name='{name}' and run_id='{stage.run_id}'"):
        if has_complete_record(version):
            return version
        delete_unfinished(client, name, str(version.version))
    return None


def new_version(stage, model_uri: str, served, quantized, data) -> str:
    name = stage.config.registry.model_name
    tags = {STATE_TAG: PENDING, **version_tags(stage, served, quantized, data)}
    with stage.run.tracking.fluent():  # the registry store looks the logged model up there
        number = create_version(stage.run.client, name, model_uri, tags)
    kill_point("register:after-version")
    return number


def check_and_decide(stage, kind, data, served, serving_dir, version, gates, champion, evaluation):
    """Served-model check, gate record, decision; returns (promote, reason, all gates)."""
    config, client = stage.config, stage.run.client
    name = config.registry.model_name
    checked = list(gates)
    if config.serve.served_model_check:
        golden = kind.golden_set(stage, data, served, serving_dir)
        served_gate = served_model_check(stage, golden, f"models:/{name}/{version}")
        checked.append(served_gate)
        if not served_gate.passed:
            raise GateFailed(served_gate)
    kill_point("register:after-served-check")
    all_gates = [*checked, *([champion] if champion else [])]
    promote, reason = decide(config.registry, checked, champion, evaluation.production_refusal)
    write_gate_record(client, name, version, all_gates)
    compared = evaluation.production_version or "none"
    for key, value in {COMPARED_TAG: compared, "promoted": str(promote).lower()}.items():
        client.set_model_version_tag(name, version, key, value)
    client.set_model_version_tag(name, version, "decision", reason[:5000])
    client.set_model_version_tag(name, version, STATE_TAG, DECIDED)
    kill_point("register:after-decision")
    return promote, reason, all_gates


def finish(stage: StageContext, version: ModelVersion) -> tuple[bool, str, str | None]:
    """Challenger, then production (if decided and production is the version compared with);
    idempotent, so a resumed run finishes what a killed one began. (promoted, reason, previous)"""
    client, name = stage.run.client, version.name
    number = str(version.version)
    promote, reason = version.tags.get("promoted") == "true", version.tags["decision"]
    client.set_registered_model_alias(name, CHALLENGER, number)
    kill_point("register:after-challenger")
    previous = version.tags.get("previous_production")
    current = version_by_alias(client, name, PRODUCTION)
    holder = str(current.version) if current is not None else "none"
    compared = version.tags.get(COMPARED_TAG, holder)
    if promote and version.tags.get("rolled_back") == "true":
        reason = (
            f"v{number} was rolled back by hand after this run promoted it; it is not promoted "
            f"again (promote it explicitly to undo the rollback)"
        )
    elif promote and holder not in (compared, number):
        reason = (
            f"production moved to v{holder} while this run compared the candidate with "
            f"v{compared}; re-run the pipeline to compare it with v{holder}"
        )
    if reason != version.tags["decision"]:
        promote = False
        client.set_model_version_tag(name, number, "promoted", "false")
        client.set_model_version_tag(name, number, "decision", reason)
    if promote:
        previous = move_production(client, name, number, reason)
    client.set_model_version_tag(name, number, STATE_TAG, COMPLETE)
    stage.run.set_tags({"registry.version": number, "registry.promoted": str(promote)})
    return promote, reason, previous


def _log_champion(stage: StageContext, champion: Gate | None, comparison: Comparison | None):
    if champion is None or comparison is None:
        return
    stage.run.log_gate(champion)
    stage.run.log_metrics(
        {
            f"production/{comparison.metric}_delta": comparison.delta,
            f"production/{comparison.metric}_delta_ci_low": comparison.low,
            f"production/{comparison.metric}_delta_ci_high": comparison.high,
        }
    )


def register(
    stage: StageContext,
    kind: TaskKind,
    data: PreparedData,
    evaluation: Evaluation,
    quantized: QuantizedModel,
    served: ServeReport,
    gates: list[Gate],
) -> Registration:
    """Register, check the served version, record its gates, set challenger, maybe promote."""
    config, client = stage.config, stage.run.client
    name = config.registry.model_name
    comparison = kind.compare(stage, data, served, evaluation)
    champion = champion_gate(config.registry, comparison, evaluation.production_refusal)
    _log_champion(stage, champion, comparison)
    ensure_registered_model(client, name, kind.DESCRIPTION)
    version = earlier_version(stage, name)
    if version is None:
        facts = {"data": data, "evaluation": evaluation, "quantized": quantized, "served": served}
        facts |= {"interval": kind.interval(stage, data, served), "gates": gates}
        model_uri, serving_dir = log_serving_model(stage, kind, facts)
        number = new_version(stage, model_uri, served, quantized, data)
        try:
            check_and_decide(
                stage, kind, data, served, serving_dir, number, gates, champion, evaluation
            )
        except BaseException:
            delete_unfinished(client, name, number)  # leave nothing half-written behind
            raise
        version = client.get_model_version(name, number)
    promoted, reason, previous = finish(stage, version)
    result = Registration(
        model_name=name,
        version=str(version.version),
        model_uri=f"models:/{name}/{version.version}",
        promoted=promoted,
        reason=reason,
        previous_production=previous,
        gates=gate_record(version) or [*gates, *([champion] if champion else [])],
        comparison=comparison,
    )
    summary = kind.summary(served)
    write_report(stage.run, result, served, evaluation, quantized, summary, config.registry.metric)
    return result
