"""quantize for classification: each variant scored on the test split against fp32.

Scores: accuracy and top-1 agreement with fp32's predictions; latency: batch-1 p50 over
single test texts. Gates: agreement >= quantize.min_top1_agreement, accuracy drop <=
quantize.max_accuracy_drop. Static variants are calibrated on shuffled training texts; the
sensitivity search probes validation texts (training texts where there is no validation
split), never the test split the gates use. The head (pooler and classifier) stays fp32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.classification.data import load_split
from tasks.classification.modeling import session_feed, session_logits
from tasks.common.gates import Gate, evaluate_gate
from tasks.common.latency import latency_ms
from tasks.common.models import load_tokenizer
from tasks.common.onnx import ONNX_FILE, open_session
from tasks.common.quantization import Candidate, quantize_stage
from tasks.common.stage import StageContext
from tasks.records import OnnxModel, PreparedData, QuantizedModel

CALIBRATION_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# the classification head of transformers' sequence classifiers (BERT's pooler + classifier,
# RoBERTa's classifier.dense/out_proj, DistilBERT's pre_classifier, decoders' score)
HEAD_PATTERN = r"(^|/)(pooler|classifier|pre_classifier|score)(/|$)"


@dataclass
class ClassifierScorer:
    """Accuracy, agreement with fp32 and batch-1 latency of one ONNX classifier."""

    config: Any
    tokenizer: Any
    test: Any
    probe_texts: list[str]
    score_name: str = "accuracy"
    latency_name: str = "p50_ms"
    head_pattern: str = HEAD_PATTERN

    def probe(self, folder: Path) -> np.ndarray:
        """Logits on the probe texts (CPU), for the sensitivity search."""
        config = self.config
        session = open_session(folder / ONNX_FILE, "cpu", config.serve.num_threads)
        return session_logits(
            session,
            self.tokenizer,
            self.probe_texts,
            config.data.max_length,
            config.eval.batch_size,
        )

    def _session(self, folder: Path):
        config = self.config
        device = "cuda" if config.serve.device == "cuda" else "cpu"
        return open_session(folder / ONNX_FILE, device, config.serve.num_threads)

    def _singles(self) -> list:
        """The first 32 test texts, one request each."""
        length = self.config.data.max_length
        return [
            self.tokenizer([t], truncation=True, max_length=length, return_tensors="np")
            for t in self.test["text"][:32]
        ]

    def requests(self, folder: Path) -> tuple[Callable[[Any], Any], list, float]:
        """A batch-1 request on folder's graph, the test texts to send, and divisor 1."""
        session = self._session(folder)
        return (
            lambda batch: session.run(["logits"], session_feed(session, batch)),
            self._singles(),
            1.0,
        )

    def score(self, folder: Path, name: str, reference) -> tuple[Candidate, np.ndarray]:
        config, test = self.config, self.test
        request, singles, _ = self.requests(folder)
        session = self._session(folder)
        logits = session_logits(
            session, self.tokenizer, test["text"], config.data.max_length, config.eval.batch_size
        )
        predictions = np.argmax(logits, axis=-1)
        timing = latency_ms(
            request, singles, config.serve.warmup_runs, max(20, config.serve.latency_runs // 2)
        )
        agreement = 1.0 if reference is None else float(np.mean(predictions == reference))
        accuracy = float(np.mean(predictions == np.asarray(test["labels"])))
        candidate = Candidate(
            name=name,
            model_file=str(folder / ONNX_FILE),
            scores={"accuracy": accuracy, "top1_agreement": agreement},
            p50_ms=timing["p50_ms"],
            size_mb=(folder / ONNX_FILE).stat().st_size / 2**20,
        )
        return candidate, predictions

    def gates(self, candidate: Candidate, fp32: Candidate) -> list[Gate]:
        q = self.config.quantize
        return [
            evaluate_gate(
                "quantized_top1_agreement",
                candidate.scores["top1_agreement"],
                q.min_top1_agreement,
                ">=",
            ),
            evaluate_gate(
                "quantized_accuracy_drop",
                fp32.scores["accuracy"] - candidate.scores["accuracy"],
                q.max_accuracy_drop,
                "<=",
            ),
        ]


def quantize(stage: StageContext, data: PreparedData, onnx: OnnxModel) -> QuantizedModel:
    """Build the variants, score and time each against fp32, pick one, log everything."""
    config = stage.config
    scorer = ClassifierScorer(
        config,
        load_tokenizer(config.model),
        load_split(stage, data, "test"),
        probe_texts(stage, data, config.quantize.sensitivity_probe_samples),
    )

    def calibration():
        train = load_split(stage, data, "train").shuffle(seed=config.data.seed)
        columns = [c for c in CALIBRATION_INPUTS if c in train.column_names]
        samples = min(config.quantize.calibration_samples, len(train))
        return train.select(range(samples)).select_columns(columns)

    ref, choice = quantize_stage(stage, onnx.model, scorer, calibration)
    return QuantizedModel.from_choice(ref, choice, scorer.score_name)


def probe_texts(stage: StageContext, data: PreparedData, count: int) -> list[str]:
    """The first count validation texts (training texts when there is no validation split)."""
    split = "validation" if data.rows.get("validation") else "train"
    texts = load_split(stage, data, split)["text"]
    return list(texts[:count])
