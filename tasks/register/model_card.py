"""The model card: README.md at the root of the registered model, written before registration.

It says what the model is (base model, LoRA settings), what it learned from (data source and
digest, rows), how well the served model does on the test split (with a bootstrap interval),
which gates it passed, its limits and how to serve it. The decision about production comes
later and goes in the model version's description.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pandas as pd

from tasks.common.champion import Comparison
from tasks.common.config import PipelineConfig
from tasks.common.credentials import redact
from tasks.common.gates import Gate
from tasks.records import Evaluation, PreparedData, QuantizedModel, ServeReport

CARD_FILE = "README.md"


@dataclass(frozen=True)
class CardFacts:
    """What the card reports: the stage records, the served score's interval, the gates
    passed so far, the kind's serving.json part and the signature's input example."""

    data: PreparedData
    evaluation: Evaluation
    quantized: QuantizedModel
    served: ServeReport
    interval: Comparison
    gates: list[Gate]
    spec: dict
    example: pd.DataFrame


def gate_table(gates: list[Gate]) -> str:
    rows = "\n".join(
        f"| {g.name} | {g.value:.6g} | {g.comparison} {g.threshold:.6g} | "
        f"{'pass' if g.passed else 'FAIL'} |"
        for g in gates
    )
    return f"| gate | value | required | result |\n|---|---|---|---|\n{rows}\n"


def _data_section(config: PipelineConfig, data: PreparedData, spec: dict) -> str:
    rows = ", ".join(f"{k} {v}" for k, v in data.rows.items())
    dropped = ", ".join(f"{k} {v}" for k, v in data.dropped.items() if v) or "none"
    labels = spec.get("label_names")
    return (
        f"## Data\n\n- source: `{redact(config.data.path)}`\n"
        f"- content sha256: `{data.content_sha256}`\n- rows: {rows} (dropped: {dropped})\n"
        + (f"- labels ({len(labels)}): {', '.join(map(str, labels))}\n" if labels else "")
    )


def _training_section(config: PipelineConfig, run_id: str) -> str:
    lora, train = config.lora, config.train
    targets = lora.target_modules
    targets = ", ".join(targets) if isinstance(targets, list) else targets
    return (
        f"## Training\n\n- base model: `{redact(config.model.name_or_path)}`\n"
        f"- LoRA: r {lora.r}, alpha {lora.alpha}, dropout {lora.dropout}, rsLoRA "
        f"{lora.use_rslora}, targets {targets}\n"
        f"- optimizer: learning rate {train.learning_rate}, {train.epochs} epoch(s), batch "
        f"{train.batch_size}, seed {train.seed}\n- MLflow run: `{run_id}`\n"
    )


def _metrics_section(
    config: PipelineConfig, evaluation: Evaluation, quantized, served, ci: Comparison
) -> str:
    metric = config.registry.metric
    others = "\n".join(
        f"| {k} | {v:.4f} |" for k, v in sorted(served.metrics.items()) if k != metric
    )
    return (
        f"## Test metrics\n\nThe served model ({quantized.variant} ONNX on {served.provider}) on "
        f"the {len(served.answers)} test examples:\n\n| metric | value |\n|---|---|\n"
        f"| **{metric}** | **{ci.delta:.4f}** ({ci.confidence:.0%} bootstrap CI "
        f"{ci.low:.4f} to {ci.high:.4f}) |\n{others}\n\n"
        f"The adapter in PyTorch before export: {metric} {evaluation.metrics[metric]:.4f}.\n"
    )


def _limits_section(config: PipelineConfig, quantized: QuantizedModel, n_test: int) -> str:
    return (
        "## Limits\n\n"
        f"- Measured only on a test split of the same data ({n_test} examples): quality on "
        f"other sources, domains, languages or lengths is not measured.\n"
        f"- Inputs longer than {config.data.max_length} tokens are cut to their first "
        f"{config.data.max_length}.\n"
        f"- The served graph is `{quantized.variant}` ({quantized.reason}); its answers may "
        f"differ from the PyTorch adapter's on a few inputs, within the gates below.\n"
    )


def _serving_section(name: str, example: pd.DataFrame) -> str:
    body = json.dumps({"dataframe_records": example.to_dict(orient="records")})
    return (
        "## How to serve\n\n```bash\n"
        f'mlflow models serve -m "models:/{name}@production" --env-manager local --port 5001\n'
        f"curl -s http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\\n"
        f"  -d '{body}'\n```\n"
    )


def model_card(config: PipelineConfig, run_id: str, description: str, facts: CardFacts) -> str:
    """The card's Markdown."""
    name, f = config.registry.model_name, facts
    return (
        f"# {name}\n\n{description}\n\n"
        + _data_section(config, f.data, f.spec)
        + "\n"
        + _training_section(config, run_id)
        + "\n"
        + _metrics_section(config, f.evaluation, f.quantized, f.served, f.interval)
        + "\n## Gates passed before registration\n\n"
        + gate_table(f.gates)
        + "\nThe served-model check, the comparison with production and the decision are in "
        "this version's description and tags.\n\n"
        + _limits_section(config, f.quantized, len(f.served.answers))
        + "\n"
        + _serving_section(name, f.example)
    )
