"""What the MLflow UI shows for a pipeline run: its name, source and description, metrics in
chart groups, and a registered version with a description, a model card, a signature with
outputs and pinned requirements. Working folders go once their contents are logged."""

from __future__ import annotations

import re
from pathlib import Path

import mlflow
import pytest
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE, MLFLOW_SOURCE_NAME, MLFLOW_USER

from tasks.common.fingerprint import pipeline_key
from tasks.common.runs import claim_run
from tasks.common.storage import run_folder, tidy
from tasks.common.tracking import Tracking, start_pipeline_run
from tasks.common.training import checkpoint_dir
from tasks.stages import prepare_data, train_lora

NAME = "tiny-classifier"
GROUPS = {
    "train",
    "eval",
    "test",
    "production",
    "gate",
    "quantize",
    "onnx",
    "serve",
    "time",
}


def test_every_metric_sits_in_a_chart_group_without_counts_or_duplicates(run):
    metrics = run.client.get_run(run.run_id).data.metrics
    ungrouped = [k for k in metrics if "/" not in k or k.split("/")[0] not in GROUPS]
    assert ungrouped == []
    assert not [k for k in metrics if "class_count" in k]  # a table artifact instead
    assert "train/loss" in metrics and "eval/accuracy" in metrics and "test/macro_f1" in metrics
    # the Trainer's closing summary repeats train/final_loss and train/runtime_seconds
    assert not [
        k for k in metrics if k.startswith(("train/train_", "eval/runtime", "train/total_flos"))
    ]
    assert not [k for k in metrics if k.endswith(("samples_per_second", "steps_per_second"))
                and k.startswith("eval/")]  # fmt: skip


def test_the_version_has_a_description_with_the_decision_and_key_figures(run):
    version = run.client.get_model_version(NAME, "1")
    text = version.description
    assert text.startswith("Production moved to v1")
    metric = run.config.registry.metric
    assert f"test {metric}: served {run.served.metrics[metric]:.4f}" in text
    assert "gates passed" in text and f"/runs/{run.run_id}" in text
    note = run.client.get_run(run.run_id).data.tags[MLFLOW_RUN_NOTE]
    assert "**Production moved to v1" in note  # the run's description says it too


def test_the_registered_model_carries_a_card_a_full_signature_and_pinned_requirements(run):
    version = run.client.get_model_version(NAME, "1")
    with run.tracking.fluent():
        info = mlflow.models.get_model_info(f"models:/{NAME}/1")
        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=version.source))
    assert info.signature.outputs.input_names() == ["label", "score", "probabilities"]
    card = (folder / "README.md").read_text()
    for heading in ("## Data", "## Training", "## Test metrics", "## Gates", "## Limits"):
        assert heading in card
    assert run.data.content_sha256 in card and f"r {run.config.lora.r}," in card
    assert re.search(r"95% bootstrap CI \d\.\d{4} to \d\.\d{4}", card)
    assert "merge_parity_max_abs_diff" in card and "mlflow models serve -m" in card
    pins = dict(
        line.split("==")
        for line in (folder / "requirements.txt").read_text().split()
        if "==" in line
    )
    assert {"onnxruntime", "transformers", "tokenizers", "numpy", "pandas"} <= set(pins)


def test_a_new_run_is_named_by_model_date_and_key_and_says_who_started_it(
    tmp_path, make_tiny_config
):
    config = make_tiny_config(tmp_path)
    tracking = Tracking.connect(config.tracking)
    key = pipeline_key(config)
    claim = claim_run(tracking, config, key)
    claim.lease.release()
    run = tracking.client.get_run(claim.run_id)
    assert re.fullmatch(rf"{NAME}-20\d{{6}}-{key[:8]}", run.info.run_name)
    tags = run.data.tags
    assert tags[MLFLOW_USER] and tags[MLFLOW_SOURCE_NAME].startswith("flows/retrain.py")
    assert tags["mlflow.source.git.commit"] and "mlflow.source.type" in tags
    assert tags[MLFLOW_RUN_NOTE].startswith(f"LoRA retrain of `{config.model.name_or_path}`")


@pytest.mark.parametrize("keep", [False, True])
def test_checkpoints_are_removed_once_training_finished(tmp_path, make_tiny_config, keep):
    overrides = ["train.max_steps=4", "train.checkpoint_steps=2", f"output.keep={keep}".lower()]
    config = make_tiny_config(tmp_path, overrides)
    run_id = start_pipeline_run(config)
    train_lora(config, prepare_data(config, run_id), run_id)
    kept = checkpoint_dir(config, run_id)
    assert (kept / "checkpoint-4").is_dir() if keep else not kept.exists()


@pytest.mark.parametrize("keep", [False, True])
def test_a_working_folder_is_removed_unless_output_keep(tmp_path, make_tiny_config, keep):
    config = make_tiny_config(tmp_path, [f"output.keep={str(keep).lower()}"])
    folder = run_folder(config, "abc")
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "x.bin").write_bytes(b"1")
    tidy(config, folder)
    assert folder.exists() == keep
    tidy(config, tmp_path / "never-made")  # a folder already gone is fine
