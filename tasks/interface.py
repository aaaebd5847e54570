"""The interface every task kind implements: one function per stage, plus how it is served.

A task kind is a folder under tasks/ whose kind.py module provides these names, and one entry
in tasks/kinds.py. Stages call them with a StageContext (the config, the MLflow run, checked
working folders) and the records of earlier stages; they return records (tasks/records.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import pandas as pd
from mlflow.models import ModelSignature

from tasks.common.champion import Comparison
from tasks.common.config import PipelineConfig
from tasks.common.stage import StageContext
from tasks.common.training import TrainingSetup
from tasks.records import (
    Evaluation,
    GoldenSet,
    MergedModel,
    OnnxModel,
    PreparedData,
    QuantizedModel,
    ServeReport,
    TrainedAdapter,
)


class TaskKind(Protocol):
    NAME: str
    """The config.task value that selects this kind."""
    DESCRIPTION: str
    """What a registered model of this kind is for (the registered model's description)."""
    SERVING_CODE: Path
    """The pyfunc file logged with every model (models-from-code; imports nothing of ours)."""
    WATCHED: bool
    """Whether the data watch (tasks/watch) reads this kind's data: text and label columns."""

    def prepare_data(self, stage: StageContext) -> PreparedData:
        """Read, validate, clean, split and tokenize config.data; save and log the splits."""

    def training_setup(self, config: PipelineConfig, data_dir: Path) -> TrainingSetup:
        """The LoRA model (and any new head), tokenizer, collator and metrics to train, from
        the folder prepare_data logged. Every rank of a distributed run builds its own."""

    def search_objective(self, config: PipelineConfig) -> tuple[str, str]:
        """The validation metric a search trial is scored on (a key of the Trainer's
        evaluation, without eval_) and its direction, maximize or minimize."""

    def evaluate(
        self, stage: StageContext, data: PreparedData, trained: TrainedAdapter
    ) -> Evaluation:
        """Score the adapter model, and the current production model, on the test split."""

    def merge(
        self, stage: StageContext, data: PreparedData, trained: TrainedAdapter
    ) -> MergedModel:
        """Fold the adapter into the base weights; gate on parity with the adapter model."""

    def export(self, stage: StageContext, data: PreparedData, merged: MergedModel) -> OnnxModel:
        """Export the merged model to ONNX fp32; gate on parity with PyTorch."""

    def quantize(self, stage: StageContext, data: PreparedData, onnx: OnnxModel) -> QuantizedModel:
        """Build and score the int8 (or fp16) variants; ship the fastest one passing its gates."""

    def serve_check(
        self,
        stage: StageContext,
        data: PreparedData,
        quantized: QuantizedModel,
        merged: MergedModel,
    ) -> ServeReport:
        """Answer the test split as the served model does; time it against PyTorch."""

    def signature(self, config: PipelineConfig) -> tuple[ModelSignature, pd.DataFrame, list[str]]:
        """The registered pyfunc's signature, an input example and its pip requirements."""

    def serving_spec(self, stage: StageContext, data: PreparedData) -> dict:
        """What the pyfunc reads from serving.json beyond the ONNX file, variant and device."""

    def golden_set(
        self, stage: StageContext, data: PreparedData, served: ServeReport, serving_dir: Path
    ) -> GoldenSet:
        """The requests `mlflow models serve` must answer as the served pyfunc (the model in
        serving_dir) answers them in this process."""

    def compare(
        self, stage: StageContext, data: PreparedData, served: ServeReport, evaluation: Evaluation
    ) -> Comparison | None:
        """The served candidate against production (paired bootstrap), or None without one."""

    def interval(self, stage: StageContext, data: PreparedData, served: ServeReport) -> Comparison:
        """The served model's registry.metric on the test split with its bootstrap interval
        (`delta` holds the metric), for the model card."""

    def summary(self, served: ServeReport) -> str:
        """One line of the served model's scores and speed, for the promotion report."""
