"""How a chat decoder is registered and served: its pyfunc, signature, serving.json, checks."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from mlflow.types.schema import Array, Object, Property

from tasks.causal.evaluate import eval_prompts
from tasks.causal.text_metrics import per_example
from tasks.common.champion import Comparison, bootstrap_mean, paired_bootstrap_scores
from tasks.common.serving import pinned
from tasks.common.stage import StageContext
from tasks.records import Evaluation, GoldenSet, PreparedData, ServeReport

SERVING_CODE = Path(__file__).resolve().parent / "onnx_causal_lm.py"
REQUIREMENTS = [
    "onnxruntime",
    "transformers",
    "tokenizers",
    "numpy",
    "pandas",
    "optimum",
    "optimum-onnx",
    "torch",
]


def signature(config) -> tuple[ModelSignature, pd.DataFrame, list[str]]:
    """The pyfunc's signature (messages or prompt in, max_new_tokens param), input example and
    pip requirements."""
    messages = Array(Object([Property("role", "string"), Property("content", "string")]))
    signature = ModelSignature(
        inputs=Schema(
            [
                ColSpec(messages, "messages", required=False),
                ColSpec("string", "prompt", required=False),
            ]
        ),
        outputs=Schema(
            [
                ColSpec("string", "text"),
                ColSpec("long", "new_tokens"),
                ColSpec("string", "finish_reason"),
            ]
        ),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", config.eval.max_new_tokens)]),
    )
    example = pd.DataFrame({"prompt": ["My card was charged twice. Which team handles it?"]})
    return signature, example, pinned(REQUIREMENTS)


def serving_spec(stage: StageContext, data: PreparedData) -> dict:
    """What the pyfunc needs beyond the ONNX file: the default number of new tokens."""
    return {"max_new_tokens": stage.config.eval.max_new_tokens}


def golden_set(
    stage: StageContext, data: PreparedData, served: ServeReport, serving_dir: Path
) -> GoldenSet:
    """The first serve.golden_requests eval conversations and the answers serve_check got for
    them from the served pyfunc in this process (greedy at batch 1: batching cannot differ)."""
    n = min(stage.config.serve.golden_requests, len(served.answers))
    messages = list(eval_prompts(stage, data)["messages"])[:n]
    return GoldenSet(
        records=[{"messages": json.loads(m)} for m in messages],
        expected=served.answers[: len(messages)],
        answer_key="text",
        well_formed=lambda answer: True,
    )


def compare(
    stage: StageContext, data: PreparedData, served: ServeReport, evaluation: Evaluation
) -> Comparison | None:
    """Paired bootstrap of the per-prompt registry.metric: served candidate minus production."""
    if evaluation.production_answers is None or evaluation.production_refusal is not None:
        return None
    registry = stage.config.registry
    production = per_example(registry.metric, evaluation.production_answers, served.references)
    return paired_bootstrap_scores(
        registry.metric, served.scores, production, registry.bootstrap_samples, registry.confidence
    )


def interval(stage: StageContext, data: PreparedData, served: ServeReport) -> Comparison:
    """The served model's mean per-prompt registry.metric, with a bootstrap interval."""
    registry = stage.config.registry
    return bootstrap_mean(
        registry.metric, served.scores, registry.bootstrap_samples, registry.confidence
    )


def summary(served: ServeReport) -> str:
    """One line of the served model's scores and speed against PyTorch."""
    m, t = served.metrics, served.timings
    return (
        f"ROUGE-L {m['rouge_l']:.4f}, exact match {m['exact_match']:.4f}; time to first "
        f"token p50 {t['serve/onnx.ttft_p50_ms']:.2f} ms (PyTorch "
        f"{t['serve/torch.ttft_p50_ms']:.2f} ms), {t['serve/onnx.tokens_per_second']:.1f} "
        f"tokens/s (PyTorch {t['serve/torch.tokens_per_second']:.1f})"
    )
