"""Every stage on the tiny BERT, run once per module in pipeline order, asserting values."""

from __future__ import annotations

import json
from types import SimpleNamespace

import mlflow
import numpy as np
import onnx
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from tasks import export_onnx as export_module
from tasks import quantize as quantize_module
from tasks.errors import GateFailed
from tasks.evaluate import evaluate
from tasks.export_onnx import export_onnx
from tasks.merge import merge
from tasks.prepare_data import prepare_data
from tasks.quantize import instruction_set, quantize
from tasks.register import register
from tasks.serve_check import serve_check
from tasks.tracking import start_pipeline_run
from tasks.train_lora import train_lora


@pytest.fixture(scope="module")
def run(tmp_path_factory, make_tiny_config):
    tmp = tmp_path_factory.mktemp("pipeline")
    config = make_tiny_config(tmp)
    run_id = start_pipeline_run(config)
    out = SimpleNamespace(config=config, run_id=run_id, tmp=tmp)
    out.data = prepare_data(config, run_id)
    out.trained = train_lora(config, out.data, run_id)
    out.evaluation = evaluate(config, out.data, out.trained, run_id)
    out.merged = merge(config, out.data, out.trained, run_id)
    out.onnx = export_onnx(config, out.data, out.merged, run_id)
    out.quantized = quantize(config, out.data, out.onnx, run_id)
    out.served = serve_check(config, out.data, out.quantized, out.merged, run_id)
    out.gates = [out.merged.parity, *out.onnx.gates, *out.quantized.gates]
    out.registration = register(
        config, out.data, out.evaluation, out.quantized, out.served, out.gates, run_id
    )
    return out


def aliases(name: str = "tiny-classifier") -> dict[str, str]:
    return {k: str(v) for k, v in MlflowClient().get_registered_model(name).aliases.items()}


def metric_history(run_id: str, key: str) -> list[float]:
    return [m.value for m in MlflowClient().get_metric_history(run_id, key)]


def test_train_counts_trainable_parameters_and_logs_curves(run):
    hidden, layers, labels = 32, 2, 4
    lora = 2 * layers * run.config.lora.r * (hidden + hidden)  # query and value in each layer
    head = hidden * labels + labels
    assert run.trained.trainable_params == lora + head
    steps = run.trained.global_steps
    assert steps == 2 * int(np.ceil(140 / 16))
    assert len(metric_history(run.run_id, "train.loss")) == steps // 2  # logging_steps=2
    assert len(metric_history(run.run_id, "train.learning_rate")) == steps // 2
    assert all(np.isfinite(metric_history(run.run_id, "train.grad_norm")))
    assert len(metric_history(run.run_id, "eval.accuracy")) == 2  # one per epoch
    assert run.trained.device == "cpu" and run.trained.precision == "fp32"


def test_adapter_is_saved_in_peft_format_with_the_head(run):
    folder = run.trained.adapter.fetch()
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (
        config["peft_type"] == "LORA"
        and config["r"] == 4
        and config["modules_to_save"] == ["classifier"]
    )
    weights = load_file(folder / "adapter_model.safetensors")
    assert "base_model.model.classifier.weight" in weights
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight" in weights
    names = {a.path for a in MlflowClient().list_artifacts(run.run_id, "adapter")}
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= names


def test_adapter_loads_in_peft_with_the_same_logits(run):
    peft = pytest.importorskip("peft")
    from tasks.modeling import load_adapted_model, load_classifier, load_tokenizer, predict_logits

    folder = run.trained.adapter.fetch()
    labels = run.data.label_names
    ours = load_adapted_model(run.config.model, folder, labels)
    base = load_classifier(str(run.config.model.name_or_path), labels)
    theirs = peft.PeftModel.from_pretrained(base, str(folder)).eval()
    tokenizer = load_tokenizer(run.config.model)
    texts = ["my card was charged twice", "the parcel never arrived"]
    np.testing.assert_allclose(
        predict_logits(ours, tokenizer, texts, 64),
        predict_logits(theirs, tokenizer, texts, 64),
        atol=1e-5,
    )


def test_evaluate_metrics_match_the_predictions_table(run):
    table = pd.read_csv(run.tmp / "outputs" / run.run_id / "evaluation" / "test_predictions.csv")
    assert len(table) == 40
    accuracy = float((table["label"] == table["predicted"]).mean())
    assert run.evaluation.metrics["accuracy"] == pytest.approx(accuracy)
    logged = MlflowClient().get_run(run.run_id).data.metrics
    assert logged["test.accuracy"] == pytest.approx(accuracy)
    assert {
        "test.macro_f1",
        "test.precision.billing",
        "test.recall.billing",
        "test.f1.billing",
    } <= set(logged)
    assert run.evaluation.production_metrics is None  # nothing in production yet
    names = {a.path for a in MlflowClient().list_artifacts(run.run_id, "evaluation")}
    assert "evaluation/confusion_matrix.png" in names


def test_merge_parity_gate_and_merged_weights(run):
    gate = run.merged.parity
    assert gate.passed and gate.value <= 1e-4 and gate.threshold == 1e-4
    folder = run.merged.model.fetch()
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    merged = load_file(folder / "model.safetensors")
    base = load_file(run.config.model.name_or_path + "/model.safetensors")
    adapter = load_file(run.trained.adapter.fetch() / "adapter_model.safetensors")
    key = "encoder.layer.0.attention.self.query"
    a = adapter[f"base_model.model.bert.{key}.lora_A.weight"]
    b = adapter[f"base_model.model.bert.{key}.lora_B.weight"]
    scale = run.config.lora.alpha / run.config.lora.r
    expected = base[f"{key}.weight"] + scale * b @ a
    torch.testing.assert_close(merged[f"bert.{key}.weight"], expected, atol=1e-6, rtol=0)
    assert not torch.equal(merged[f"bert.{key}.weight"], base[f"{key}.weight"])


def test_merge_gate_fails_on_a_corrupted_merge(run, monkeypatch):
    import tasks.merge as merge_module

    real_unload = merge_module.unload_lora

    def corrupt(model):
        plain = real_unload(model)
        weight = plain.bert.encoder.layer[0].attention.self.query.weight
        with torch.no_grad():
            weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
        return plain

    monkeypatch.setattr(merge_module, "unload_lora", corrupt)
    with pytest.raises(GateFailed, match=r"^gate merge_parity_max_abs_diff FAILED: measured"):
        merge(run.config, run.data, run.trained, run.run_id)


def test_onnx_parity_gates(run):
    parity, argmax = run.onnx.gates
    assert parity.name == "onnx_parity_max_abs_diff" and parity.passed and parity.value <= 1e-4
    assert argmax.name == "onnx_argmax_mismatches" and argmax.value == 0


def test_onnx_gate_fails_when_the_exported_graph_is_perturbed(run, monkeypatch):
    real_export = export_module.main_export

    def export_then_perturb(model_dir, output, **kwargs):
        real_export(model_dir, output, **kwargs)
        path = output / "model.onnx"
        graph = onnx.load(str(path))
        for init in graph.graph.initializer:
            if "classifier" in init.name and "weight" in init.name:
                values = onnx.numpy_helper.to_array(init) * 3.0
                init.CopyFrom(onnx.numpy_helper.from_array(values, init.name))
        onnx.save(graph, str(path))

    monkeypatch.setattr(export_module, "main_export", export_then_perturb)
    with pytest.raises(GateFailed, match=r"^gate onnx_parity_max_abs_diff FAILED"):
        export_onnx(run.config, run.data, run.merged, run.run_id)


def test_quantized_model_predicts_and_is_smaller(run):
    q = run.quantized
    folder = q.model.fetch()
    assert (folder / "model_quantized.onnx").is_file()
    assert q.instruction_set == instruction_set()
    agreement, drop = q.gates
    assert 0.5 <= agreement.value <= 1.0 and agreement.passed
    assert drop.value == pytest.approx(q.fp32_accuracy - q.int8_accuracy)
    logged = MlflowClient().get_run(run.run_id).data.metrics
    assert logged["quantize.size_ratio"] < 0.8


def test_quantize_gate_fails_when_int8_flips_predictions(run, monkeypatch):
    real_predict = quantize_module._predict

    def flipping(model_file, *args):
        predictions = real_predict(model_file, *args)
        return (predictions + 1) % 4 if model_file.name == "model_quantized.onnx" else predictions

    monkeypatch.setattr(quantize_module, "_predict", flipping)
    with pytest.raises(GateFailed, match=r"^gate quantized_top1_agreement FAILED: measured 0, "):
        quantize(run.config, run.data, run.onnx, run.run_id)


def test_instruction_set_choice():
    assert instruction_set({"avx2", "avx512f", "avx512_vnni"}, "x86_64") == "avx512_vnni"
    assert instruction_set({"avx2", "avx512f"}, "x86_64") == "avx512"
    assert instruction_set({"avx2"}, "x86_64") == "avx2"
    assert instruction_set(set(), "aarch64") == "arm64"


def test_serve_check_uses_cpu_provider_and_times_both_engines(run):
    s = run.served
    assert s.provider == "CPUExecutionProvider"
    assert s.metrics["accuracy"] == pytest.approx(run.quantized.int8_accuracy)
    for engine in ("onnx_int8", "torch_fp32"):
        p50, p95 = (
            s.timings[f"serve.{engine}.batch1_p50_ms"],
            s.timings[f"serve.{engine}.batch1_p95_ms"],
        )
        assert 0 < p50 <= p95
        assert s.timings[f"serve.{engine}.batch8_per_second"] > 0
    tags = MlflowClient().get_run(run.run_id).data.tags
    assert tags["serve.provider"] == "CPUExecutionProvider"


def test_register_sets_aliases_and_gate_tags(run):
    r = run.registration
    client = MlflowClient()
    assert r.version == "1" and r.promoted
    assert aliases() == {"challenger": "1", "production": "1"}
    tags = client.get_model_version("tiny-classifier", "1").tags
    assert tags["gate.merge_parity_max_abs_diff"].startswith("passed")
    assert tags["run_id"] == run.run_id
    report = json.loads(mlflow.artifacts.load_text(f"runs:/{run.run_id}/promotion/report.json"))
    assert report["promoted"] is True and len(report["gates"]) == 5


def test_registered_model_answers_with_labels_and_probabilities(run):
    served = mlflow.pyfunc.load_model("models:/tiny-classifier@production")
    texts = ["I was charged twice for one order", "my package is late"]
    out = served.predict(pd.DataFrame({"text": texts}))
    assert list(out.columns) == ["label", "score", "probabilities"]
    assert set(out["label"]) <= set(run.data.label_names)
    for probs in out["probabilities"]:
        assert sum(probs.values()) == pytest.approx(1.0)
        assert set(probs) == set(run.data.label_names)


def test_production_does_not_move_when_a_gate_failed(run):
    failed = [
        *run.gates[:-1],
        type(run.gates[-1])("quantized_accuracy_drop", 0.3, 0.02, "<=", False),
    ]
    result = register(
        run.config, run.data, run.evaluation, run.quantized, run.served, failed, run.run_id
    )
    assert not result.promoted and result.reason == "gates failed: quantized_accuracy_drop"
    assert aliases() == {"challenger": result.version, "production": "1"}


def test_production_does_not_move_for_a_worse_candidate_and_moves_for_an_equal_one(run):
    worse = run.served.__class__(
        provider=run.served.provider,
        metrics={k: v - 0.1 for k, v in run.served.metrics.items()},
        timings=run.served.timings,
    )
    evaluation = run.evaluation.__class__(
        metrics=run.evaluation.metrics,
        production_metrics=dict(run.served.metrics),
        production_version="1",
    )
    result = register(run.config, run.data, evaluation, run.quantized, worse, run.gates, run.run_id)
    assert not result.promoted and result.reason.startswith(
        "candidate trails production: gate champion_macro_f1_delta FAILED"
    )
    assert aliases()["production"] == "1"

    equal = register(
        run.config, run.data, evaluation, run.quantized, run.served, run.gates, run.run_id
    )
    assert equal.promoted and equal.previous_production == "1"
    assert aliases() == {"challenger": equal.version, "production": equal.version}
