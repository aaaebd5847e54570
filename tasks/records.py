"""What stages hand each other: small, typed, task-neutral records, never live models.

A record names folders by ArtifactRef (the run they were logged to and where they are on this
machine), carries metrics as dicts and per-example answers as strings (a label name for
classification, a generated text for causal_lm), so the flows, the register stage and the
gpu-pool flow treat every task kind alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tasks.common.champion import Comparison
from tasks.common.gates import Gate
from tasks.common.quantization import Candidate, Choice
from tasks.common.tracking import ArtifactRef


@dataclass(frozen=True)
class PreparedData:
    """The tokenized splits (a DatasetDict folder plus what the task kind saved beside it)."""

    dataset: ArtifactRef
    rows: dict[str, int]
    content_sha256: str
    dropped: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainedAdapter:
    """The adapter folder (PEFT format, head included) and how it was trained."""

    adapter: ArtifactRef
    device: str
    precision: str
    trainable_params: int
    total_params: int
    global_steps: int
    chosen: dict[str, Any] = field(default_factory=dict)  # a search's winning values, if any


@dataclass(frozen=True)
class Evaluation:
    """Test-split metrics of the candidate (adapter model) and of production, if any.

    production_answers are production's answers on the examples the served candidate is
    compared on (ServeReport.answers), for the paired champion comparison; production_refusal
    says why the two cannot be compared (e.g. different label sets), which keeps production.
    """

    metrics: dict[str, float]
    production_version: str | None = None
    production_metrics: dict[str, float] | None = None
    production_answers: list[str] | None = None
    production_refusal: str | None = None


@dataclass(frozen=True)
class MergedModel:
    """A standard transformers model folder (safetensors + tokenizer) and its parity gate."""

    model: ArtifactRef
    parity: Gate


@dataclass(frozen=True)
class OnnxModel:
    """An ONNX fp32 model folder (model.onnx, config, tokenizer) and its parity gates."""

    model: ArtifactRef
    gates: list[Gate]


@dataclass(frozen=True)
class QuantizedModel:
    """The folder that will be served (SERVED_FILE + tokenizer + config) and why it was chosen.

    score_name is what fp32_score and served_score measure on the test split (accuracy for
    classification, perplexity for causal_lm).
    """

    model: ArtifactRef
    variant: str
    instruction_set: str
    score_name: str
    fp32_score: float
    served_score: float
    reason: str
    gates: list[Gate]
    candidates: list[Candidate]

    @classmethod
    def from_choice(cls, model: ArtifactRef, choice: Choice, score_name: str) -> QuantizedModel:
        return cls(
            model=model,
            variant=choice.chosen.name,
            instruction_set=choice.instruction_set,
            score_name=score_name,
            fp32_score=choice.fp32.scores[score_name],
            served_score=choice.chosen.scores[score_name],
            reason=choice.reason,
            gates=choice.gates,
            candidates=choice.candidates,
        )


@dataclass(frozen=True)
class ServeReport:
    """What the served model answered and scored, and how fast both engines answered.

    answers[i] is the served model's answer to example i, references[i] the expected one and
    scores[i] the answer's registry.metric score where it is one per example (causal_lm), or
    its correctness (classification).
    """

    provider: str
    metrics: dict[str, float]
    timings: dict[str, float]
    answers: list[str]
    references: list[str]
    scores: list[float]


@dataclass(frozen=True)
class GoldenSet:
    """The requests the served-model check sends, and the in-process answers it requires.

    answer_key names the field of each served answer that must equal expected[i];
    well_formed(answer) checks the rest of an answer (e.g. probabilities that sum to 1).
    """

    records: list[dict]
    expected: list[str]
    answer_key: str
    well_formed: Callable[[dict], bool]


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


@dataclass(frozen=True)
class PipelineOutputs:
    """Every stage's record of one pipeline run, in stage order (None: not reached)."""

    data: PreparedData | None = None
    trained: TrainedAdapter | None = None
    evaluation: Evaluation | None = None
    merged: MergedModel | None = None
    onnx: OnnxModel | None = None
    quantized: QuantizedModel | None = None
    served: ServeReport | None = None
    registration: Registration | None = None

    @property
    def gates(self) -> list[Gate]:
        """The gates on the model itself (merge, ONNX, quantization), which register records."""
        return [self.merged.parity, *self.onnx.gates, *self.quantized.gates]
