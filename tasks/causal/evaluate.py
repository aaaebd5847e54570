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

from tasks.causal.data import load_data_tokenizer, load_split
from tasks.causal.generation import decode, greedy_new_tokens, perplexity, response_nll
from tasks.causal.modeling import load_adapted_causal_lm, load_base_causal_lm
from tasks.causal.text_metrics import generation_metrics
from tasks.common.config import PipelineConfig
from tasks.common.registry import PRODUCTION, production_version
from tasks.common.stage import StageContext
from tasks.records import Evaluation, PreparedData, TrainedAdapter

TASK = "causal_lm"

SAMPLE_ROWS = 50  # generations shown in the MLflow table


def eval_prompts(stage: StageContext, data: PreparedData):
    """The test rows every model answers (and the served model is checked on)."""
    test = load_split(stage, data, "test")
    return test.select(range(min(stage.config.eval.generation_prompts, len(test))))


def answer_with(model, tokenizer, prompts, config: PipelineConfig) -> list[str]:
    ids = greedy_new_tokens(model, tokenizer, prompts, config.eval.max_new_tokens)
    return [decode(tokenizer, seq) for seq in ids]


def score_model(model, tokenizer, test, rows, config: PipelineConfig):
    """Loss/perplexity on the whole test split and generation metrics on `rows`."""
    nll, count = response_nll(model, test, config.eval.batch_size)
    answers = answer_with(model, tokenizer, rows["prompt"], config)
    metrics = {"loss": nll / count, "perplexity": perplexity(nll, count)}
    return metrics | generation_metrics(answers, rows["reference"]), answers


def production_answers(stage: StageContext, rows):
    """(version, answers) of models:/NAME@production on the rows' conversations, or Nones."""
    config = stage.config
    name = config.registry.model_name
    version = production_version(stage.run.client, name, TASK)
    if version is None:
        return None, None
    with stage.run.tracking.fluent():
        served = mlflow.pyfunc.load_model(f"models:/{name}@{PRODUCTION}")
    frame = pd.DataFrame({"messages": [json.loads(m) for m in rows["messages"]]})
    answers = served.predict(frame, params={"max_new_tokens": config.eval.max_new_tokens})
    return str(version.version), [str(a) for a in answers["text"]]


def generations_table(rows, answers, base_answers, version, prod_answers) -> pd.DataFrame:
    table = pd.DataFrame(
        {
            "prompt": [json.loads(m)[-1]["content"] for m in rows["messages"]],
            "reference": list(rows["reference"]),
            "candidate": answers,
            "base": base_answers,
        }
    )
    if prod_answers is not None:
        table[f"production_v{version}"] = prod_answers
    return table


def evaluate(stage: StageContext, data: PreparedData, trained: TrainedAdapter) -> Evaluation:
    """Candidate, base and production on the test split; metrics and generations logged."""
    config, run = stage.config, stage.run
    test = load_split(stage, data, "test")
    rows = eval_prompts(stage, data)
    tokenizer = load_data_tokenizer(stage, data)
    candidate = load_adapted_causal_lm(config.model, stage.fetch(trained.adapter))
    metrics, answers = score_model(candidate, tokenizer, test, rows, config)
    del candidate
    base_metrics, base_answers = score_model(
        load_base_causal_lm(config.model), tokenizer, test, rows, config
    )
    version, prod_answers = production_answers(stage, rows)
    logged = {f"test/{k}": v for k, v in metrics.items()}
    logged |= {f"test/base.{k}": v for k, v in base_metrics.items()}
    prod_metrics = None
    if prod_answers is not None:
        prod_metrics = generation_metrics(prod_answers, list(rows["reference"]))
        logged |= {f"production/{k}": v for k, v in prod_metrics.items()}
    run.log_metrics(logged)

    table = generations_table(rows, answers, base_answers, version, prod_answers)
    out_dir = stage.stage_dir("evaluation")
    table.to_csv(out_dir / "test_generations.csv", index=False)
    (out_dir / "metrics.json").write_text(
        json.dumps(
            {"candidate": metrics, "base": base_metrics, "production": prod_metrics}, indent=2
        )
    )
    run.log_folder(out_dir, "evaluation")
    run.client.log_table(run.run_id, table.head(SAMPLE_ROWS), "evaluation/generations.json")
    return Evaluation(
        metrics=metrics,
        production_version=version,
        production_metrics=prod_metrics,
        production_answers=prod_answers,
    )
