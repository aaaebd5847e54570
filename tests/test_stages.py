"""Train, evaluate, merge and export on the tiny BERT (the session `run` fixture), with values."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from tasks.common import onnx as export_module
from tasks.common.errors import GateFailed
from tasks.common.hardware import bf16_kernels
from tasks.stages import export_onnx, merge


def metric_history(run, key: str) -> list[float]:
    return [m.value for m in run.client.get_metric_history(run.run_id, key)]


def test_train_counts_trainable_parameters_and_logs_curves(run):
    hidden, layers, labels = 32, 2, 4
    lora = 2 * layers * run.config.lora.r * (hidden + hidden)  # query and value in each layer
    head = hidden * labels + labels
    assert run.trained.trainable_params == lora + head
    steps = run.trained.global_steps
    assert steps == 2 * int(np.ceil(140 / 16))
    assert len(metric_history(run, "train/loss")) == steps // 2  # logging_steps=2
    assert len(metric_history(run, "train/learning_rate")) == steps // 2
    assert all(np.isfinite(metric_history(run, "train/grad_norm")))
    assert len(metric_history(run, "eval/accuracy")) == 2  # one per epoch
    # precision auto: bf16 autocast where this CPU has bf16 matrix kernels, fp32 elsewhere
    expected = "bf16" if bf16_kernels() else "fp32"
    assert run.trained.device == "cpu" and run.trained.precision == expected
    tags = run.client.get_run(run.run_id).data.tags
    assert tags["train.precision"] == expected
    assert tags["train.cpu_bf16_kernels"] == (bf16_kernels() or "none")


def test_adapter_is_saved_in_peft_format_with_the_head(run):
    folder = run.fetch(run.trained.adapter)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (
        config["peft_type"] == "LORA"
        and config["r"] == 4
        and config["modules_to_save"] == ["classifier"]
    )
    weights = load_file(folder / "adapter_model.safetensors")
    assert "base_model.model.classifier.weight" in weights
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight" in weights
    names = {a.path for a in run.client.list_artifacts(run.run_id, "adapter")}
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= names


def test_adapter_loads_in_peft_with_the_same_logits(run):
    peft = pytest.importorskip("peft")
    from tasks.classification.modeling import load_adapted_model, load_classifier, predict_logits
    from tasks.common.models import load_tokenizer

    folder = run.fetch(run.trained.adapter)
    labels = run.label_names
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
    logged = run.client.get_run(run.run_id).data.metrics
    assert logged["test/accuracy"] == pytest.approx(accuracy)
    assert {
        "test/macro_f1",
        "test/precision.billing",
        "test/recall.billing",
        "test/f1.billing",
    } <= set(logged)
    assert run.evaluation.production_metrics is None  # nothing in production yet
    names = {a.path for a in run.client.list_artifacts(run.run_id, "evaluation")}
    assert "evaluation/confusion_matrix.png" in names


def test_merge_parity_gate_and_merged_weights(run):
    gate = run.merged.parity
    assert gate.passed and gate.value <= 1e-4 and gate.threshold == 1e-4
    folder = run.fetch(run.merged.model)
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    merged = load_file(folder / "model.safetensors")
    base = load_file(run.config.model.name_or_path + "/model.safetensors")
    adapter = load_file(run.fetch(run.trained.adapter) / "adapter_model.safetensors")
    key = "encoder.layer.0.attention.self.query"
    a = adapter[f"base_model.model.bert.{key}.lora_A.weight"]
    b = adapter[f"base_model.model.bert.{key}.lora_B.weight"]
    scale = run.config.lora.alpha / run.config.lora.r
    expected = base[f"{key}.weight"] + scale * b @ a
    torch.testing.assert_close(merged[f"bert.{key}.weight"], expected, atol=1e-6, rtol=0)
    assert not torch.equal(merged[f"bert.{key}.weight"], base[f"{key}.weight"])


def test_merge_gate_fails_on_a_corrupted_merge(run, monkeypatch):
    import tasks.common.merging as merge_module

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
