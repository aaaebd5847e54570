"""export for classification: optimum's text-classification ONNX, fused by onnxruntime's
transformer optimizer (model type bert: Attention, BiasGelu, EmbedLayerNormalization;
SkipLayerNormalization for CUDA), its last layer computing the pooled token only
(first_token.py), gated on the graph's logits and argmax against PyTorch."""

from __future__ import annotations

import numpy as np

from tasks.classification.data import label_names, load_split
from tasks.classification.modeling import load_classifier, predict_logits, session_logits
from tasks.common.first_token import first_token_file
from tasks.common.gates import require
from tasks.common.models import load_tokenizer
from tasks.common.onnx import (
    ONNX_FILE,
    fuse_graph,
    max_abs_diff,
    open_session,
    optimum_export,
    ort_model_type,
)
from tasks.common.stage import StageContext
from tasks.records import MergedModel, OnnxModel, PreparedData


def export(stage: StageContext, data: PreparedData, merged: MergedModel) -> OnnxModel:
    """optimum export and fusion, then compare the fp32 graph's logits and argmax with PyTorch
    on the test split."""
    config = stage.config
    merged_dir = stage.fetch(merged.model)
    out_dir = optimum_export(
        merged_dir, stage.stage_dir("onnx"), "text-classification", config.export.opset
    )
    if config.export.fuse:
        fused = fuse_graph(out_dir, ort_model_type(out_dir, "bert"), config.serve.device)
        stage.run.log_metrics({f"onnx/fused.{op}": n for op, n in fused.items()})
    if config.export.first_token:
        nodes = first_token_file(out_dir / ONNX_FILE)
        stage.run.log_metrics({"onnx/first_token_nodes": nodes})
    texts = load_split(stage, data, "test")["text"]
    tokenizer = load_tokenizer(config.model)
    torch_logits = predict_logits(
        load_classifier(str(merged_dir), label_names(stage, data)),
        tokenizer,
        texts,
        config.data.max_length,
        config.eval.batch_size,
    )
    session = open_session(out_dir / ONNX_FILE, device="cpu")
    onnx_logits = session_logits(
        session, tokenizer, texts, config.data.max_length, config.eval.batch_size
    )
    mismatches = (
        int(np.sum(np.argmax(onnx_logits, -1) != np.argmax(torch_logits, -1)))
        if onnx_logits.shape == torch_logits.shape
        else len(texts)
    )
    gates = [
        stage.gate(
            "onnx_parity_max_abs_diff",
            max_abs_diff(onnx_logits, torch_logits),
            config.export.parity_max_abs_diff,
            "<=",
        ),
        stage.gate("onnx_argmax_mismatches", mismatches, 0, "<="),
    ]
    stage.run.log_metrics({"onnx/fp32_size_mb": (out_dir / ONNX_FILE).stat().st_size / 2**20})
    for gate in gates:
        require(gate)
    return OnnxModel(model=stage.run.log_folder(out_dir, "onnx"), gates=gates)
