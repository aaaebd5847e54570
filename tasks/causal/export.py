"""export_onnx for causal_lm: optimum's decoder export with KV cache, gated on greedy parity.

Gates on the probe prompts (the first export.parity_prompts test prompts): full-sequence logits
of ONNX fp32 vs PyTorch (max abs difference), and greedy generation of export.parity_new_tokens
new tokens (end-of-sequence suppressed, so every prompt yields that many) token for token.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tasks.causal.data import load_data_tokenizer
from tasks.causal.generation import first_step_logits, greedy_new_tokens
from tasks.causal.merge import max_abs_diff_all, probe_prompts
from tasks.causal.modeling import load_causal_lm, open_causal_onnx
from tasks.config import PipelineConfig
from tasks.export_onnx import ONNX_FILE, OnnxModel, optimum_export
from tasks.gates import evaluate_gate, require
from tasks.merge import MergedModel
from tasks.prepare_data import PreparedData
from tasks.tracking import connect, log_folder, log_gate, log_metrics, stage_timer


def copy_missing_files(source: Path, target: Path) -> None:
    """Tokenizer, chat template and generation config files the exporter did not write."""
    for item in source.iterdir():
        if item.is_file() and item.suffix != ".safetensors" and not (target / item.name).exists():
            shutil.copy2(item, target / item.name)


def tokens_differing(reference: list[list[int]], other: list[list[int]]) -> int:
    """Positions (over the reference sequences) where other has another token or none."""
    count = 0
    for ref, got in zip(reference, other, strict=True):
        count += sum(a != b for a, b in zip(ref, got, strict=False)) + abs(len(ref) - len(got))
    return count


def export_causal(
    config: PipelineConfig, data: PreparedData, merged: MergedModel, run_id: str
) -> OnnxModel:
    """Export with past key/values, then gate ONNX fp32 against PyTorch on the probe prompts."""
    connect(config.tracking)
    with stage_timer(run_id, "export_onnx"):
        merged_dir = merged.model.fetch()
        out_dir = optimum_export(config, merged_dir, run_id, "text-generation-with-past")
        copy_missing_files(merged_dir, out_dir)
        tokenizer = load_data_tokenizer(data)
        prompts = probe_prompts(config, data)
        n = config.export.parity_new_tokens
        torch_model = load_causal_lm(str(merged_dir)).eval()
        onnx_model = open_causal_onnx(out_dir, ONNX_FILE, device="cpu")
        logits_diff = max_abs_diff_all(
            first_step_logits(onnx_model, tokenizer, prompts),
            first_step_logits(torch_model, tokenizer, prompts),
        )
        expected = greedy_new_tokens(torch_model, tokenizer, prompts, n, min_new_tokens=n)
        got = greedy_new_tokens(onnx_model, tokenizer, prompts, n, min_new_tokens=n)
        gates = [
            log_gate(
                run_id,
                evaluate_gate(
                    "onnx_parity_max_abs_diff", logits_diff, config.export.parity_max_abs_diff, "<="
                ),
            ),
            log_gate(
                run_id,
                evaluate_gate(
                    "onnx_greedy_tokens_differing", tokens_differing(expected, got), 0, "<="
                ),
            ),
        ]
        log_metrics(
            run_id,
            {
                "onnx.fp32_size_mb": (out_dir / ONNX_FILE).stat().st_size / 2**20,
                "onnx.parity_prompts": len(prompts),
                "onnx.parity_new_tokens": n,
            },
        )
        for gate in gates:
            require(gate)
        ref = log_folder(run_id, out_dir, "onnx")
    return OnnxModel(model=ref, gates=gates)
