"""Stage 4: fold the adapter into the base weights and save a plain transformers model folder."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lora_core import LoraError, merge_lora, unload_lora
from tasks.config import PipelineConfig
from tasks.errors import ModelError
from tasks.evaluate import load_test_split
from tasks.gates import Gate, evaluate_gate, require
from tasks.modeling import load_adapted_model, load_classifier, load_tokenizer, predict_logits
from tasks.prepare_data import PreparedData
from tasks.stage import stage_task
from tasks.storage import stage_dir
from tasks.tracking import ArtifactRef, connect, log_folder, log_gate, stage_timer
from tasks.train_lora import TrainedAdapter


@dataclass(frozen=True)
class MergedModel:
    """A standard transformers model folder (safetensors + tokenizer) and its parity gate."""

    model: ArtifactRef
    parity: Gate


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0


def merge_and_unload(model):
    """Safe merge (in a copy, finite check, then swap in), then the LoRA wrappers out."""
    try:
        merge_lora(model, safe=True)
    except LoraError as exc:
        raise ModelError(f"merge failed: {exc}") from exc
    return unload_lora(model)  # already merged: wrappers out, merged weights stay


def merge(
    config: PipelineConfig, data: PreparedData, trained: TrainedAdapter, run_id: str
) -> MergedModel:
    """Merge safely, save, reload the saved folder and gate on logits parity with the adapter."""
    if config.task == "causal_lm":
        from tasks.causal.merge import merge_causal  # imported here: it imports this module

        return merge_causal(config, data, trained, run_id)
    connect(config.tracking)
    with stage_timer(run_id, "merge"):
        texts = load_test_split(data)["text"]
        tokenizer = load_tokenizer(config.model)
        model = load_adapted_model(config.model, trained.adapter.fetch(), data.label_names)
        adapter_logits = predict_logits(
            model, tokenizer, texts, config.data.max_length, config.eval.batch_size
        )
        plain = merge_and_unload(model)
        out_dir = stage_dir(config, run_id, "merged_model")
        plain.save_pretrained(str(out_dir), safe_serialization=True)
        tokenizer.save_pretrained(str(out_dir))
        reloaded = load_classifier(str(out_dir), data.label_names)
        merged_logits = predict_logits(
            reloaded, tokenizer, texts, config.data.max_length, config.eval.batch_size
        )
        gate = log_gate(
            run_id,
            evaluate_gate(
                "merge_parity_max_abs_diff",
                max_abs_diff(merged_logits, adapter_logits),
                config.merge.parity_max_abs_diff,
                "<=",
            ),
        )
        require(gate)
        ref = log_folder(run_id, out_dir, "merged_model")
    return MergedModel(model=ref, parity=gate)


merge_task = stage_task(merge, name="merge", retries=1)
