"""Stage 5: export the merged model to ONNX with optimum and gate on parity with PyTorch."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from optimum.exporters.onnx import main_export

from tasks.config import PipelineConfig
from tasks.evaluate import load_test_split
from tasks.gates import Gate, evaluate_gate, require
from tasks.merge import MergedModel, max_abs_diff
from tasks.modeling import load_classifier, load_tokenizer, predict_logits
from tasks.onnx_runtime import open_session, session_logits
from tasks.prepare_data import PreparedData
from tasks.stage import stage_task
from tasks.storage import stage_dir
from tasks.tracking import ArtifactRef, connect, log_folder, log_gate, log_metrics, stage_timer

ONNX_FILE = "model.onnx"


@dataclass(frozen=True)
class OnnxModel:
    """An ONNX fp32 model folder (model.onnx, config, tokenizer) and its parity gates."""

    model: ArtifactRef
    gates: list[Gate]


def optimum_export(config: PipelineConfig, merged_dir: Path, run_id: str, task: str) -> Path:
    """optimum's ONNX export of a merged model folder into a clean stage folder."""
    out_dir = stage_dir(config, run_id, "onnx")
    if out_dir.exists():
        shutil.rmtree(out_dir)  # a retried export starts clean
    main_export(
        str(merged_dir),
        out_dir,
        task=task,
        opset=config.export.opset,
        do_validation=False,
        local_files_only=True,
    )
    return out_dir


def export_onnx(
    config: PipelineConfig, data: PreparedData, merged: MergedModel, run_id: str
) -> OnnxModel:
    """optimum export, then compare ONNX fp32 logits and argmax with PyTorch on the test split."""
    if config.task == "causal_lm":
        from tasks.causal.export import export_causal  # imported here: it imports this module

        return export_causal(config, data, merged, run_id)
    connect(config.tracking)
    with stage_timer(run_id, "export_onnx"):
        merged_dir = merged.model.fetch()
        out_dir = optimum_export(config, merged_dir, run_id, "text-classification")
        texts = load_test_split(data)["text"]
        tokenizer = load_tokenizer(config.model)
        torch_logits = predict_logits(
            load_classifier(str(merged_dir), data.label_names),
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
            log_gate(
                run_id,
                evaluate_gate(
                    "onnx_parity_max_abs_diff",
                    max_abs_diff(onnx_logits, torch_logits),
                    config.export.parity_max_abs_diff,
                    "<=",
                ),
            ),
            log_gate(run_id, evaluate_gate("onnx_argmax_mismatches", mismatches, 0, "<=")),
        ]
        log_metrics(run_id, {"onnx.fp32_size_mb": (out_dir / ONNX_FILE).stat().st_size / 2**20})
        for gate in gates:
            require(gate)
        ref = log_folder(run_id, out_dir, "onnx")
    return OnnxModel(model=ref, gates=gates)


export_onnx_task = stage_task(export_onnx, name="export-onnx", retries=1)
