"""evaluate for causal_lm: held-out loss and perplexity, greedy answers scored against references.

Three models answer the same test prompts (the first eval.generation_prompts): the candidate
(base + adapter), the base model alone and, when there is one, the `production` model through
its registered pyfunc (ONNX). Loss and perplexity (response tokens only) are measured for the
candidate and the base. A table of sample generations goes to MLflow (evaluation/generations).
"""

from __future__ import annotations

import json

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

from tasks.causal.data import load_data_tokenizer, load_split
from tasks.causal.generation import decode, greedy_new_tokens, perplexity, response_nll
from tasks.causal.modeling import load_adapted_causal_lm, load_base_causal_lm
from tasks.causal.text_metrics import generation_metrics, per_example
from tasks.config import PipelineConfig
from tasks.errors import ConfigError
from tasks.evaluate import Evaluation
from tasks.prepare_data import PreparedData
from tasks.registry import PRODUCTION, version_by_alias
from tasks.storage import stage_dir
from tasks.tracking import connect, log_folder, log_metrics, stage_timer
from tasks.train_lora import TrainedAdapter

SAMPLE_ROWS = 50  # generations shown in the MLflow table


def eval_prompts(config: PipelineConfig, data: PreparedData):
    """The test rows every model answers (and the served model is checked on)."""
    test = load_split(data, "test")
    return test.select(range(min(config.eval.generation_prompts, len(test))))


def answer_with(model, tokenizer, prompts, config: PipelineConfig) -> list[str]:
    ids = greedy_new_tokens(model, tokenizer, prompts, config.eval.max_new_tokens)
    return [decode(tokenizer, seq) for seq in ids]


def score_model(model, tokenizer, test, rows, config: PipelineConfig):
    """Loss/perplexity on the whole test split and generation metrics on `rows`."""
    nll, count = response_nll(model, test, config.eval.batch_size)
    answers = answer_with(model, tokenizer, rows["prompt"], config)
    metrics = {"loss": nll / count, "perplexity": perplexity(nll, count)}
    return metrics | generation_metrics(answers, rows["reference"]), answers


def production_answers(config: PipelineConfig, rows):
    """(version, answers) of models:/NAME@production on the rows' conversations, or Nones."""
    name = config.registry.model_name
    version = version_by_alias(MlflowClient(), name, PRODUCTION)
    if version is None:
        return None, None
    task = version.tags.get("task", "sequence_classification")
    if task != "causal_lm":
        raise ConfigError(
            f"registry.model_name {name!r}: its production version v{version.version} is a "
            f"{task} model, not causal_lm; give this pipeline its own registry.model_name"
        )
    served = mlflow.pyfunc.load_model(f"models:/{name}@{PRODUCTION}")
    frame = pd.DataFrame({"messages": [json.loads(m) for m in rows["messages"]]})
    answers = served.predict(frame, params={"max_new_tokens": config.eval.max_new_tokens})
    return str(version.version), list(answers["text"])


def evaluate_causal(
    config: PipelineConfig, data: PreparedData, trained: TrainedAdapter, run_id: str
) -> Evaluation:
    """Candidate, base and production on the test split; metrics and generations logged."""
    connect(config.tracking)
    with stage_timer(run_id, "evaluate"):
        test = load_split(data, "test")
        rows = eval_prompts(config, data)
        tokenizer = load_data_tokenizer(data)
        candidate = load_adapted_causal_lm(config.model, trained.adapter.fetch())
        metrics, answers = score_model(candidate, tokenizer, test, rows, config)
        del candidate
        base_metrics, base_answers = score_model(
            load_base_causal_lm(config.model), tokenizer, test, rows, config
        )
        version, prod_answers = production_answers(config, rows)
        references = list(rows["reference"])
        logged = {f"test.{k}": v for k, v in metrics.items()}
        logged |= {f"base.{k}": v for k, v in base_metrics.items()}
        prod_metrics = prod_scores = None
        if prod_answers is not None:
            prod_metrics = generation_metrics(prod_answers, references)
            prod_scores = per_example(config.registry.metric, prod_answers, references)
            logged |= {f"production.{k}": v for k, v in prod_metrics.items()}
        log_metrics(run_id, logged)

        table = pd.DataFrame(
            {
                "prompt": [json.loads(m)[-1]["content"] for m in rows["messages"]],
                "reference": references,
                "candidate": answers,
                "base": base_answers,
            }
        )
        if prod_answers is not None:
            table[f"production_v{version}"] = prod_answers
        out_dir = stage_dir(config, run_id, "evaluation")
        table.to_csv(out_dir / "test_generations.csv", index=False)
        (out_dir / "metrics.json").write_text(
            json.dumps(
                {"candidate": metrics, "base": base_metrics, "production": prod_metrics}, indent=2
            )
        )
        log_folder(run_id, out_dir, "evaluation")
        MlflowClient().log_table(run_id, table.head(SAMPLE_ROWS), "evaluation/generations.json")
    return Evaluation(
        metrics=metrics,
        production_metrics=prod_metrics,
        production_version=version,
        production_scores=prod_scores,
    )
