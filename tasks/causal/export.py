"""export_onnx for causal_lm: optimum's decoder export with KV cache, gated on greedy parity.

export.fuse runs onnxruntime's transformer optimizer as model type gpt2 (optimum's table maps
llama, mistral, gpt2 and the like there; Qwen2 and other decoders it lacks get the same): it
fuses LayerNorm/RMSNorm with the residual add (SkipLayerNormalization,
SkipSimplifiedLayerNormalization) and Gelu (FastGelu). Its attention fusions do not match the
KV-cache attention optimum exports (checked on GPT-2 and Llama: none fused), so attention
stays unfused. The gates check the fused graph.

Gates on the probe prompts (the first export.parity_prompts test prompts): full-sequence logits
of ONNX fp32 vs PyTorch (max abs difference), and greedy generation of export.parity_new_tokens
new tokens (end-of-sequence suppressed, so every prompt yields that many) token for token.
"""

from __future__ import annotations

from tasks.causal.data import load_data_tokenizer
from tasks.causal.generation import first_step_logits, greedy_new_tokens
from tasks.causal.merge import probe_prompts
from tasks.causal.modeling import load_causal_lm, open_causal_onnx
from tasks.common.gates import require
from tasks.common.onnx import (
    ONNX_FILE,
    copy_missing_files,
    fuse_graph,
    max_abs_diff_all,
    optimum_export,
    ort_model_type,
)
from tasks.common.stage import StageContext
from tasks.records import MergedModel, OnnxModel, PreparedData


def tokens_differing(reference: list[list[int]], other: list[list[int]]) -> int:
    """Positions (over the reference sequences) where other has another token or none."""
    count = 0
    for ref, got in zip(reference, other, strict=True):
        count += sum(a != b for a, b in zip(ref, got, strict=False)) + abs(len(ref) - len(got))
    return count


def export(stage: StageContext, data: PreparedData, merged: MergedModel) -> OnnxModel:
    """Export with past key/values, then gate ONNX fp32 against PyTorch on the probe prompts."""
    config = stage.config
    merged_dir = stage.fetch(merged.model)
    out_dir = optimum_export(
        merged_dir, stage.stage_dir("onnx"), "text-generation-with-past", config.export.opset
    )
    copy_missing_files(merged_dir, out_dir)
    if config.export.fuse:
        fused = fuse_graph(out_dir, ort_model_type(out_dir, "gpt2"), config.serve.device)
        stage.run.log_metrics({f"onnx/fused.{op}": n for op, n in fused.items()})
    tokenizer = load_data_tokenizer(stage, data)
    prompts = probe_prompts(stage, data)
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
        stage.gate(
            "onnx_parity_max_abs_diff", logits_diff, config.export.parity_max_abs_diff, "<="
        ),
        stage.gate("onnx_greedy_tokens_differing", tokens_differing(expected, got), 0, "<="),
    ]
    stage.run.log_metrics(
        {
            "onnx/fp32_size_mb": (out_dir / ONNX_FILE).stat().st_size / 2**20,
            "onnx/parity_prompts": len(prompts),
            "onnx/parity_new_tokens": n,
        }
    )
    for gate in gates:
        require(gate)
    return OnnxModel(model=stage.run.log_folder(out_dir, "onnx"), gates=gates)
