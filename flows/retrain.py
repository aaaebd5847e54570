"""The retrain flow: prepare, train, evaluate, merge, export, quantize, serve-check, register.

STAGES is the one order of the stages; `run_stages` runs it (as Prefect tasks in the flow, as
plain functions in tests and benchmarks) and returns every stage's record.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

from prefect import flow, get_run_logger
from prefect.events import emit_event
from prefect.states import Completed

from flows import console
from flows.flow_run import cancel_training_runs, label_flow_run, tag_flow_run
from flows.search import trials_on_deployment
from flows.train import train_on_deployment
from tasks import stages
from tasks.common.config import PipelineConfig, load_config
from tasks.common.credentials import load_credentials, refuse_credentials
from tasks.common.faults import kill_point
from tasks.common.fingerprint import pipeline_key
from tasks.common.preflight import check_devices
from tasks.common.resume import StageRecords
from tasks.common.runs import Claim, claim_run
from tasks.common.storage import run_folder, tidy
from tasks.common.tracking import Tracking, end_pipeline_run
from tasks.records import (
    Evaluation,
    MergedModel,
    OnnxModel,
    PipelineOutputs,
    PreparedData,
    QuantizedModel,
    Registration,
    ServeReport,
    TrainedAdapter,
)
from tasks.search.space import with_values


@dataclass(frozen=True)
class Stage:
    """One stage: its function in tasks.stages, the PipelineOutputs field it fills (with its
    record type), and the fields it takes (in order, between the config and the run id)."""

    name: str
    output: str
    record: type
    inputs: tuple[str, ...]
    runs: Callable[[PipelineConfig], bool] = lambda config: True  # whether it runs for config


def searching(config: PipelineConfig) -> bool:
    return config.search.enabled


STAGES = (
    Stage("prepare_data", "data", PreparedData, ()),
    Stage("search", "trained", TrainedAdapter, ("data",), searching),
    Stage("train_lora", "trained", TrainedAdapter, ("data",), lambda c: not searching(c)),
    Stage("evaluate", "evaluation", Evaluation, ("data", "trained")),
    Stage("merge", "merged", MergedModel, ("data", "trained")),
    Stage("export_onnx", "onnx", OnnxModel, ("data", "merged")),
    Stage("quantize", "quantized", QuantizedModel, ("data", "onnx")),
    Stage("serve_check", "served", ServeReport, ("data", "quantized", "merged")),
    Stage(
        "register",
        "registration",
        Registration,
        ("data", "evaluation", "quantized", "served", "gates"),
    ),
)
STAGE_NAMES = tuple(stage.name for stage in STAGES)


@dataclass(frozen=True)
class RetrainResult:
    """What a pipeline run produced: its MLflow run, the registered version and the decision.

    `metric` is registry.metric: test_score is the candidate's (PyTorch, adapter) on the test
    split, served_score the served ONNX model's.
    """

    run_id: str
    model_name: str
    version: str
    promoted: bool
    reason: str
    metric: str
    test_score: float
    served_score: float


def train_task(config: PipelineConfig, data: PreparedData, run_id: str) -> TrainedAdapter:
    """In this process, or on the deployment `train.deployment` (e.g. lora-train/gpu)."""
    if config.train.deployment:
        return train_on_deployment(config, data, run_id)
    return stages.train_lora_task(config, data, run_id)


def search_task(config: PipelineConfig, data: PreparedData, run_id: str) -> TrainedAdapter:
    """Trials in this process, or as `lora-train` flow runs on `train.deployment`."""
    if config.train.deployment:
        return stages.search_task(config, data, run_id, run_trials=trials_on_deployment)
    return stages.search_task(config, data, run_id)


def stage_function(name: str, as_tasks: bool) -> Callable:
    """The stage as a Prefect task (training maybe on its deployment), or as a plain function."""
    if not as_tasks:
        return getattr(stages, name)
    placed = {"train_lora": train_task, "search": search_task}
    return placed.get(name) or getattr(stages, f"{name}_task")


def run_stages(
    config: PipelineConfig,
    run_id: str,
    as_tasks: bool = False,
    until: str = STAGE_NAMES[-1],
    between: Callable[[], None] | None = None,
    records: StageRecords | None = None,
) -> PipelineOutputs:
    """Run STAGES in order, up to and including `until`; every stage's record. between() runs
    before each stage (the lease check: stop if another process took the run over). With
    records, a stage that already finished in this run is not run again: its record is used."""
    out = PipelineOutputs()
    chosen = [stage for stage in STAGES[: STAGE_NAMES.index(until) + 1] if stage.runs(config)]
    for number, stage in enumerate(chosen, start=1):
        kill_point(f"before:{stage.name}")
        if between is not None:
            between()
        console.stage_started(config, stage.name, number, len(chosen))
        start = time.perf_counter()
        result = reused = records.load(stage.name, stage.record) if records else None
        if result is None:
            inputs = [getattr(out, field) for field in stage.inputs]
            result = stage_function(stage.name, as_tasks)(config, *inputs, run_id)
            if records:
                records.save(stage.name, result)
        console.stage_finished(stage.name, result, time.perf_counter() - start, reused is not None)
        out = replace(out, **{stage.output: result})
        if getattr(result, "chosen", None):  # a search's winning values hold from here on
            config = with_values(config, result.chosen)
    return out


def run_pipeline(config: PipelineConfig, claim: Claim) -> RetrainResult:
    """Run every stage inside the claimed MLflow run; it ends FAILED if any stage raises.

    A resumed (unfinished) run continues: training resumes from its last checkpoint and an
    already registered version is finished, not registered again.
    """
    start = time.perf_counter()
    run_id = claim.run_id
    records = StageRecords(Tracking.connect(config.tracking).run(run_id))
    try:
        out = run_stages(config, run_id, as_tasks=True, between=claim.lease.check, records=records)
    except BaseException:
        end_pipeline_run(run_id, config, "FAILED")
        raise
    run = Tracking.connect(config.tracking).run(run_id)
    run.log_metrics({"time/pipeline": time.perf_counter() - start})
    end_pipeline_run(run_id, config, "FINISHED")
    tidy(config, run_folder(config, run_id))  # all of it is in the artifact store now
    registration = out.registration
    return RetrainResult(
        run_id=run_id,
        model_name=registration.model_name,
        version=registration.version,
        promoted=registration.promoted,
        reason=registration.reason,
        metric=config.registry.metric,
        test_score=out.evaluation.metrics[config.registry.metric],
        served_score=out.served.metrics[config.registry.metric],
    )


def record_trigger(tracking: Tracking, run_id: str, trigger: dict[str, Any]) -> None:
    """The event that started this run: a flow-run tag, MLflow tags and trigger/event.json."""
    event = str(trigger.get("event") or "unknown")
    tag_flow_run(f"trigger:{event}")
    run = tracking.run(run_id)
    run.set_tags({"trigger.event": event, "trigger.event_id": str(trigger.get("id", ""))[:250]})
    run.log_json(dict(trigger), "trigger/event.json")


def announce_decision(result: RetrainResult) -> None:
    """`lora.candidate.promoted` or `lora.candidate.kept` (what the not-promoted alert hears)."""
    emit_event(
        event=f"lora.candidate.{'promoted' if result.promoted else 'kept'}",
        resource={
            "prefect.resource.id": f"lora.model.{result.model_name}",
            "prefect.resource.name": result.model_name,
        },
        payload={
            "version": result.version,
            "reason": result.reason,
            "mlflow_run_id": result.run_id,
            "metric": result.metric,
            "test_score": result.test_score,
        },
    )


def skipped(claim: Claim) -> dict:
    reason = (
        f"nothing new to train: run {claim.run_id} already trained this data and "
        f"config and registered v{claim.skipped_version} (force=True retrains)"
    )
    get_run_logger().info(reason)
    return {
        "status": "skipped",
        "run_id": claim.run_id,
        "version": claim.skipped_version,
        "reason": reason,
    }


@flow(name="lora-retrain", log_prints=True, on_cancellation=[cancel_training_runs])
def retrain_flow(
    config_path: str = "configs/default.yaml",
    overrides: list[str] | None = None,
    force: bool = False,
    wait: bool = False,
    trigger: dict[str, Any] | None = None,
) -> dict:
    """Retrain a LoRA adapter from a config file (plus KEY=VALUE overrides) and maybe promote it.

    Same data and config as a finished run: ends early ("nothing new to train") unless force.
    Same as an unfinished (killed or failed) run: continues that run. Same as a run in progress
    in another process: an error (exit 2), or, with wait, waits for it to end first.
    `trigger` is the event that started the run (a deployment trigger fills it): the flow run
    is tagged `trigger:<event>` and the MLflow run records it.
    """
    refuse_credentials(overrides)
    config = load_config(config_path, overrides)
    load_credentials(config.tracking)
    check_devices(config)
    tracking = Tracking.connect(config.tracking)
    claim = claim_run(tracking, config, pipeline_key(config), force, wait)
    label_flow_run(tracking, claim.run_id)
    if trigger:
        record_trigger(tracking, claim.run_id, trigger)
    if claim.skipped:
        return skipped(claim)
    try:
        result = run_pipeline(config, claim)
    finally:
        claim.lease.release()
    outcome = "promoted" if result.promoted else "kept"
    tag_flow_run(f"model:{result.model_name}", f"version:{result.version}", outcome)
    announce_decision(result)
    message = (
        f"{result.model_name} v{result.version}: production "
        f"{'moved to it' if result.promoted else 'kept'} ({result.reason}); test "
        f"{result.metric} {result.test_score:.3f}, served {result.served_score:.3f}"
    )
    get_run_logger().info("run %s: %s", result.run_id, message)
    return Completed(message=message[:5000], data={"status": "completed", **asdict(result)})
