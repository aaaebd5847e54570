"""quantize for causal_lm: int8 (CPU) or fp16 (GPU) variants gated on tokens and perplexity.

Each variant is scored against ONNX fp32 in the same run: agreement of its greedy answers to the
probe prompts with fp32's, token by token (up to export.parity_new_tokens, stopping at eos), test
perplexity (response tokens), and the batch-1 decode time per token. Static int8 needs a
calibrated KV-cache graph and is not offered for decoders. The sensitivity search probes the
full-sequence logits of the probe prompts (the token-agreement gate's prompts; the perplexity
gate's test split is not probed). No node is kept fp32 by rule: lm_head is the largest
MatMul, and the search keeps it in fp32 only when it is sensitive.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.causal.data import load_data_tokenizer, load_split
from tasks.causal.generation import (
    first_step_logits,
    greedy_new_tokens,
    perplexity,
    response_nll,
    token_agreement,
)
from tasks.causal.merge import probe_prompts
from tasks.causal.modeling import open_causal_onnx
from tasks.common.gates import Gate, evaluate_gate
from tasks.common.latency import latency_ms
from tasks.common.onnx import ONNX_FILE
from tasks.common.quantization import Candidate, quantize_stage
from tasks.common.stage import StageContext
from tasks.records import OnnxModel, PreparedData, QuantizedModel


@dataclass
class DecoderScorer:
    """Perplexity, greedy-token agreement with fp32 and decode ms per token of one decoder."""

    config: Any
    tokenizer: Any
    prompts: list[str]
    test: Any
    score_name: str = "perplexity"
    latency_name: str = "ms_per_token"
    head_pattern: str = ""

    def probe(self, folder: Path) -> np.ndarray:
        """Every position's logits on the probe prompts (CPU), for the sensitivity search."""
        model = open_causal_onnx(folder, ONNX_FILE, "cpu", self.config.serve.num_threads)
        return np.concatenate(first_step_logits(model, self.tokenizer, self.prompts), axis=0)

    def _request(self, model) -> Callable[[str], Any]:
        steps = self.config.serve.decode_tokens
        return lambda p: greedy_new_tokens(model, self.tokenizer, [p], steps, min_new_tokens=steps)

    def requests(self, folder: Path) -> tuple[Callable[[str], Any], list[str], float]:
        """Greedy decoding of serve.decode_tokens tokens on folder's graph, the probe prompts,
        and the divisor that makes one request's time the time per token."""
        device = "cuda" if self.config.serve.device == "cuda" else "cpu"
        model = open_causal_onnx(folder, ONNX_FILE, device, self.config.serve.num_threads)
        return self._request(model), self.prompts, float(self.config.serve.decode_tokens)

    def score(self, folder: Path, name: str, reference) -> tuple[Candidate, list[list[int]]]:
        config, tokenizer, prompts = self.config, self.tokenizer, self.prompts
        device = "cuda" if config.serve.device == "cuda" else "cpu"
        model = open_causal_onnx(folder, ONNX_FILE, device, config.serve.num_threads)
        # the answers users get: greedy up to parity_new_tokens, stopping at eos (tokens forced
        # past eos are off-distribution near-ties, which say little about quantization quality)
        tokens = greedy_new_tokens(model, tokenizer, prompts, config.export.parity_new_tokens)
        nll, count = response_nll(model, self.test, config.eval.batch_size)
        steps = config.serve.decode_tokens
        timing = latency_ms(
            self._request(model),
            prompts,
            warmup=1,
            runs=max(3, config.serve.latency_runs // 10),
        )
        agreement = 1.0 if reference is None else token_agreement(reference, tokens)
        candidate = Candidate(
            name=name,
            model_file=str(folder / ONNX_FILE),
            scores={"perplexity": perplexity(nll, count), "token_agreement": agreement},
            p50_ms=timing["p50_ms"] / steps,  # batch-1 decode time per generated token
            size_mb=(folder / ONNX_FILE).stat().st_size / 2**20,
        )
        return candidate, tokens

    def gates(self, candidate: Candidate, fp32: Candidate) -> list[Gate]:
        q = self.config.quantize
        return [
            evaluate_gate(
                "quantized_token_agreement",
                candidate.scores["token_agreement"],
                q.min_token_agreement,
                ">=",
            ),
            evaluate_gate(
                "quantized_perplexity_increase",
                candidate.scores["perplexity"] / fp32.scores["perplexity"] - 1.0,
                q.max_perplexity_increase,
                "<=",
            ),
        ]


def quantize(stage: StageContext, data: PreparedData, onnx: OnnxModel) -> QuantizedModel:
    """Build the variants, score and time each against fp32, pick one, log everything."""
    scorer = DecoderScorer(
        stage.config,
        load_data_tokenizer(stage, data),
        probe_prompts(stage, data),
        load_split(stage, data, "test"),
    )
    ref, choice = quantize_stage(stage, onnx.model, scorer, calibration=lambda: None)
    return QuantizedModel.from_choice(ref, choice, scorer.score_name)
