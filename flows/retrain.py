"""The retrain flow: prepare, train, evaluate, merge, export, quantize, serve-check, register."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from prefect import flow, get_run_logger

from flows.train import train_on_deployment
from tasks.config import PipelineConfig, load_config
from tasks.evaluate import evaluate_task
from tasks.export_onnx import export_onnx_task
from tasks.fingerprint import KEY_TAG, pipeline_key, previous_run
from tasks.merge import merge_task
from tasks.prepare_data import PreparedData, prepare_data_task
from tasks.quantize import quantize_task
from tasks.register import register_task
from tasks.serve_check import serve_check_task
from tasks.tracking import (
    end_pipeline_run,
    log_metrics,
    reopen_pipeline_run,
    start_pipeline_run,
)
from tasks.train_lora import TrainedAdapter, train_lora_task


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


def train(config: PipelineConfig, data: PreparedData, run_id: str) -> TrainedAdapter:
    """In this process, or on the deployment `train.deployment` (e.g. lora-train/gpu)."""
    if config.train.deployment:
        return train_on_deployment(config, data, run_id)
    return train_lora_task(config, data, run_id)


def run_pipeline(
    config: PipelineConfig, resume_run_id: str | None = None, key: str | None = None
) -> RetrainResult:
    """Run every stage inside one MLflow run; the run ends FAILED if any stage raises.

    With resume_run_id the stages continue that (unfinished) run: training resumes from its
    last checkpoint and an already registered version is not registered again.
    """
    start = time.perf_counter()
    if resume_run_id:
        run_id = reopen_pipeline_run(resume_run_id, config)
    else:
        run_id = start_pipeline_run(config, extra_tags={KEY_TAG: key} if key else None)
    try:
        data = prepare_data_task(config, run_id)
        trained = train(config, data, run_id)
        evaluation = evaluate_task(config, data, trained, run_id)
        merged = merge_task(config, data, trained, run_id)
        onnx = export_onnx_task(config, data, merged, run_id)
        quantized = quantize_task(config, data, onnx, run_id)
        served = serve_check_task(config, data, quantized, merged, run_id)
        gates = [merged.parity, *onnx.gates, *quantized.gates]
        registration = register_task(config, data, evaluation, quantized, served, gates, run_id)
    except BaseException:
        end_pipeline_run(run_id, config, "FAILED")
        raise
    log_metrics(run_id, {"pipeline.wall_seconds": time.perf_counter() - start})
    end_pipeline_run(run_id, config, "FINISHED")
    return RetrainResult(
        run_id=run_id,
        model_name=registration.model_name,
        version=registration.version,
        promoted=registration.promoted,
        reason=registration.reason,
        metric=config.registry.metric,
        test_score=evaluation.metrics[config.registry.metric],
        served_score=served.metrics[config.registry.metric],
    )


@flow(name="lora-retrain", log_prints=True)
def retrain_flow(
    config_path: str = "configs/default.yaml",
    overrides: list[str] | None = None,
    force: bool = False,
) -> dict:
    """Retrain a LoRA adapter from a config file (plus KEY=VALUE overrides) and maybe promote it.

    Same data and config as a finished run: ends early ("nothing new to train") unless force.
    Same as an unfinished (killed or failed) run: continues that run.
    """
    config = load_config(config_path, overrides)
    key = pipeline_key(config)
    previous = previous_run(config, key)
    if previous is not None and previous.finished and not force:
        reason = (
            f"nothing new to train: run {previous.run_id} already trained this data and "
            f"config and registered v{previous.version} (force=True retrains)"
        )
        get_run_logger().info(reason)
        return {
            "status": "skipped",
            "run_id": previous.run_id,
            "version": previous.version,
            "reason": reason,
        }
    resume = previous.run_id if previous is not None and not previous.finished else None
    result = run_pipeline(config, resume_run_id=resume, key=key)
    get_run_logger().info(
        "run %s: %s v%s, test %s %.3f, served %s %.3f, production %s (%s)",
        result.run_id,
        result.model_name,
        result.version,
        result.metric,
        result.test_score,
        result.metric,
        result.served_score,
        "moved" if result.promoted else "kept",
        result.reason,
    )
    return {"status": "completed", **asdict(result)}
