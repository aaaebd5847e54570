"""The pipeline's stages: each opens the stage (MLflow run, timer, folders) and runs the step of
the task kind config.task names. Every stage is a plain function (tests call it directly) and a
Prefect task around it (the flows call those).

A Prefect task retries transient failures only: a bad input or a failed gate (PipelineError)
is never retried, while network or disk errors are, 5 s apart. No result caching: a stage's
inputs are small records and its outputs live in MLflow.
"""

from __future__ import annotations

from collections.abc import Callable

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.common.config import PipelineConfig
from tasks.common.errors import retry_if_transient
from tasks.common.gates import Gate
from tasks.common.stage import open_stage
from tasks.common.storage import tidy
from tasks.common.training import checkpoint_dir
from tasks.kinds import kind_of
from tasks.records import (
    Evaluation,
    MergedModel,
    OnnxModel,
    PreparedData,
    QuantizedModel,
    Registration,
    ServeReport,
    TrainedAdapter,
)
from tasks.register.transaction import register as register_version
from tasks.search.stage import TrialRunner
from tasks.search.stage import search as run_search
from tasks.search.trial import run_trial
from tasks.train_adapter import train_adapter


def prepare_data(config: PipelineConfig, run_id: str) -> PreparedData:
    """Read, validate, clean, split and tokenize the data; log it (stage 1)."""
    with open_stage(config, run_id, "prepare_data") as stage:
        return kind_of(config).prepare_data(stage)


def train_lora(config: PipelineConfig, data: PreparedData, run_id: str) -> TrainedAdapter:
    """Train the LoRA adapter on the training split (stage 2)."""
    with open_stage(config, run_id, "train_lora") as stage:
        trained = train_adapter(stage, data)
    tidy(config, checkpoint_dir(config, run_id))  # the adapter is logged: resume needs none
    return trained


def search(
    config: PipelineConfig,
    data: PreparedData,
    run_id: str,
    run_trials: TrialRunner | None = None,
) -> TrainedAdapter:
    """Search training settings (Optuna) and adopt the best trial's adapter (stage 2, in
    place of train_lora when search.enabled)."""
    with open_stage(config, run_id, "search") as stage:
        return run_search(stage, data, run_trials)


def evaluate(
    config: PipelineConfig, data: PreparedData, trained: TrainedAdapter, run_id: str
) -> Evaluation:
    """Score the adapter model and production on the test split (stage 3)."""
    with open_stage(config, run_id, "evaluate") as stage:
        return kind_of(config).evaluate(stage, data, trained)


def merge(
    config: PipelineConfig, data: PreparedData, trained: TrainedAdapter, run_id: str
) -> MergedModel:
    """Fold the adapter into the base weights, gated on parity (stage 4)."""
    with open_stage(config, run_id, "merge") as stage:
        return kind_of(config).merge(stage, data, trained)


def export_onnx(
    config: PipelineConfig, data: PreparedData, merged: MergedModel, run_id: str
) -> OnnxModel:
    """Export the merged model to ONNX, gated on parity with PyTorch (stage 5)."""
    with open_stage(config, run_id, "export_onnx") as stage:
        return kind_of(config).export(stage, data, merged)


def quantize(
    config: PipelineConfig, data: PreparedData, onnx: OnnxModel, run_id: str
) -> QuantizedModel:
    """Quantize, score and time every variant; keep the fastest passing one (stage 6)."""
    with open_stage(config, run_id, "quantize") as stage:
        return kind_of(config).quantize(stage, data, onnx)


def serve_check(
    config: PipelineConfig,
    data: PreparedData,
    quantized: QuantizedModel,
    merged: MergedModel,
    run_id: str,
) -> ServeReport:
    """Answer the test split as the served model does; time it against PyTorch (stage 7)."""
    with open_stage(config, run_id, "serve_check") as stage:
        return kind_of(config).serve_check(stage, data, quantized, merged)


def register(
    config: PipelineConfig,
    data: PreparedData,
    evaluation: Evaluation,
    quantized: QuantizedModel,
    served: ServeReport,
    gates: list[Gate],
    run_id: str,
) -> Registration:
    """Register the served model, check it served, maybe move production (stage 8)."""
    with open_stage(config, run_id, "register") as stage:
        return register_version(stage, kind_of(config), data, evaluation, quantized, served, gates)


def stage_task(fn: Callable, *, name: str, retries: int = 1):
    """A plain stage function as a Prefect task that retries transient failures only.

    log_prints off: the flows' log_prints would turn a library's print() into a log line even
    when the library prints into a captured sys.stdout (dill disassembles every function it
    pickles while datasets fingerprints a table: 33 lines of bytecode in prepare-data)."""
    return task(
        fn,
        name=name,
        retries=retries,
        retry_delay_seconds=5,
        cache_policy=NO_CACHE,
        retry_condition_fn=retry_if_transient,
        log_prints=False,
    )


prepare_data_task = stage_task(prepare_data, name="prepare-data", retries=2)
train_lora_task = stage_task(train_lora, name="train-lora", retries=1)
search_task = stage_task(search, name="search", retries=1)
run_trial_task = stage_task(run_trial, name="search-trial", retries=0)  # on the gpu pool
evaluate_task = stage_task(evaluate, name="evaluate", retries=2)
merge_task = stage_task(merge, name="merge", retries=1)
export_onnx_task = stage_task(export_onnx, name="export-onnx", retries=1)
quantize_task = stage_task(quantize, name="quantize", retries=1)
serve_check_task = stage_task(serve_check, name="serve-check", retries=1)
register_task = stage_task(register, name="register", retries=2)
