"""quantize for causal_lm: int8 (CPU) or fp16 (GPU) variants gated on tokens and perplexity.

Each variant is scored against ONNX fp32 in the same run: agreement of its greedy answers to the
probe prompts with fp32's, token by token (up to export.parity_new_tokens, stopping at eos), test
perplexity (response tokens), and the batch-1 decode time per token. The fastest variant that
passes both gates and beats fp32 ships as SERVED_FILE; otherwise fp32 ships, with the reason
recorded (quantize/choice.json, tags).
Static int8 needs a calibrated KV-cache graph and is not offered for decoders.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from tasks.causal.data import load_data_tokenizer, load_split
from tasks.causal.export import copy_missing_files
from tasks.causal.generation import greedy_new_tokens, perplexity, response_nll, token_agreement
from tasks.causal.merge import probe_prompts
from tasks.causal.modeling import open_causal_onnx
from tasks.config import PipelineConfig
from tasks.export_onnx import ONNX_FILE, OnnxModel
from tasks.gates import Gate, evaluate_gate
from tasks.latency import latency_ms
from tasks.prepare_data import PreparedData
from tasks.quantize import (
    QuantizedModel,
    choose,
    convert_fp16,
    instruction_set,
    log_choice,
    quantize_variant,
    served_folder,
)
from tasks.storage import stage_dir
from tasks.tracking import (
    connect,
    log_folder,
    stage_timer,
)

# metric name -> DecoderCandidate attribute; the first is the score ("quantize.served.<it>")
DECODER_FIELDS = {
    "perplexity": "perplexity",
    "token_agreement": "token_agreement",
    "ms_per_token": "p50_ms",
    "size_mb": "size_mb",
}


@dataclass(frozen=True)
class DecoderCandidate:
    """One variant: perplexity, token agreement with fp32, decode ms per token (p50), size."""

    name: str
    model_file: str
    perplexity: float
    token_agreement: float
    p50_ms: float  # batch-1 decode time per generated token, median over timed requests
    size_mb: float
    gates: list[Gate] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)


def _score(folder: Path, file_name: str, name: str, tokenizer, prompts, test, config, device, ref):
    """Generate on the probes, measure perplexity and decode speed; returns (candidate, tokens)."""
    model = open_causal_onnx(folder, file_name, device, config.serve.num_threads)
    # the answers users get: greedy up to parity_new_tokens, stopping at eos (tokens forced
    # past eos are off-distribution near-ties, which say little about quantization quality)
    tokens = greedy_new_tokens(model, tokenizer, prompts, config.export.parity_new_tokens)
    nll, count = response_nll(model, test, config.eval.batch_size)
    steps = config.serve.decode_tokens
    timing = latency_ms(
        lambda p: greedy_new_tokens(model, tokenizer, [p], steps, min_new_tokens=steps),
        prompts,
        warmup=1,
        runs=max(3, config.serve.latency_runs // 10),
    )
    candidate = DecoderCandidate(
        name=name,
        model_file=str(folder / file_name),
        perplexity=perplexity(nll, count),
        token_agreement=1.0 if ref is None else token_agreement(ref, tokens),
        p50_ms=timing["p50_ms"] / steps,
        size_mb=(folder / file_name).stat().st_size / 2**20,
    )
    return candidate, tokens


def _with_gates(candidate: DecoderCandidate, fp32: DecoderCandidate, config) -> DecoderCandidate:
    gates = [
        evaluate_gate(
            "quantized_token_agreement",
            candidate.token_agreement,
            config.quantize.min_token_agreement,
            ">=",
        ),
        evaluate_gate(
            "quantized_perplexity_increase",
            candidate.perplexity / fp32.perplexity - 1.0,
            config.quantize.max_perplexity_increase,
            "<=",
        ),
    ]
    return DecoderCandidate(**{**candidate.__dict__, "gates": gates})


def quantize_causal(
    config: PipelineConfig, data: PreparedData, onnx: OnnxModel, run_id: str
) -> QuantizedModel:
    """Build the variants, score and time each against fp32, pick one, log everything."""
    connect(config.tracking)
    with stage_timer(run_id, "quantize"):
        fp32_dir = onnx.model.fetch()
        out_dir = stage_dir(config, run_id, "quantized")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tokenizer = load_data_tokenizer(data)
        prompts = probe_prompts(config, data)
        test = load_split(data, "test")
        gpu = config.serve.device == "cuda"
        device = "cuda" if gpu else "cpu"
        isa = "cuda_fp16" if gpu else instruction_set()
        score = {"tokenizer": tokenizer, "prompts": prompts, "test": test, "config": config}

        fp32, fp32_tokens = _score(fp32_dir, ONNX_FILE, "fp32", device=device, ref=None, **score)
        candidates = []
        for name in ["fp16"] if gpu else config.quantize.variants:
            variant_dir = out_dir / "variants" / name
            variant_dir.mkdir(parents=True)
            if gpu:
                convert_fp16(fp32_dir / ONNX_FILE, variant_dir / ONNX_FILE)
            else:
                quantize_variant(fp32_dir, variant_dir, name, isa, data, config)
            copy_missing_files(fp32_dir, variant_dir)  # config, tokenizer: a loadable folder
            candidate, _ = _score(
                variant_dir, ONNX_FILE, name, device=device, ref=fp32_tokens, **score
            )
            candidates.append(_with_gates(candidate, fp32, config))
        chosen, reason = choose(fp32, candidates, config.quantize.fallback_to_fp32)

        served_dir = served_folder(out_dir, chosen.model_file, fp32_dir)
        gates = chosen.gates or _with_gates(fp32, fp32, config).gates
        log_choice(run_id, fp32, candidates, chosen, gates, isa, reason, DECODER_FIELDS)
        ref = log_folder(run_id, served_dir, "quantized")
    return QuantizedModel(
        model=ref,
        variant=chosen.name,
        instruction_set=isa,
        score_name="perplexity",
        fp32_score=fp32.perplexity,
        served_score=chosen.perplexity,
        reason=reason,
        gates=gates,
        candidates=candidates,
    )
