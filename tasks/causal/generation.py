"""Greedy answers, response-only NLL and logits for a decoder LLM, PyTorch or onnxruntime.

Every function takes either a transformers `AutoModelForCausalLM` or an optimum
`ORTModelForCausalLM`: both expose `.generate`, `.device` and `__call__(input_ids=...,
attention_mask=...)`. Called without past key values, the ORT model feeds an empty cache and
builds position_ids as 0..n-1, which is what right padding needs (real tokens come first), so
no position_ids are passed here. Prompts are already rendered (chat template applied) and are
tokenized with add_special_tokens=False.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from transformers import GenerationConfig

from tasks.causal.formatting import IGNORE_INDEX


def pad_id(tokenizer) -> int:
    """The tokenizer's pad id, else its eos id (GPT-2 tokenizers have no pad token)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def eos_ids(model, tokenizer) -> list[int]:
    """End-of-answer ids: the model's generation config eos id(s) plus the tokenizer's eos."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [configured] if isinstance(configured, int) else list(configured or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def encode_prompt(tokenizer, prompt: str) -> dict[str, torch.Tensor]:
    """A rendered prompt as a batch of one (input_ids, attention_mask), no special tokens added."""
    return tokenizer(
        prompt, add_special_tokens=False, return_token_type_ids=False, return_tensors="pt"
    )


def greedy_new_tokens(
    model, tokenizer, prompts: Sequence[str], max_new_tokens: int, min_new_tokens: int = 0
) -> list[list[int]]:
    """Greedy decoding at batch size 1; the new token ids of each prompt (eos included if hit).

    use_model_defaults=False: a model's generation_config.json (do_sample, temperature,
    repetition_penalty...) must not leak into the greedy path.
    """
    config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        eos_token_id=eos_ids(model, tokenizer),
        pad_token_id=pad_id(tokenizer),
    )
    answers = []
    with torch.inference_mode():
        for prompt in prompts:
            batch = {k: v.to(model.device) for k, v in encode_prompt(tokenizer, prompt).items()}
            out = model.generate(**batch, generation_config=config, use_model_defaults=False)
            answers.append(out[0, batch["input_ids"].shape[1] :].tolist())
    return answers


def decode(tokenizer, ids: Sequence[int]) -> str:
    """Answer text from new token ids: the one way answers become text everywhere."""
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def _logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    out = model(
        input_ids=input_ids.to(model.device),
        attention_mask=attention_mask.to(model.device),
        use_cache=False,
    )
    return out.logits.float()


def response_nll(
    model, examples: Iterable[Mapping[str, Sequence[int]]], batch_size: int = 8
) -> tuple[float, int]:
    """Summed NLL (nats) of the response tokens and their count.

    Each example has `input_ids` and `labels` (IGNORE_INDEX on prompt tokens); logits[t] predicts
    labels[t+1]. Batches are right-padded with an attention mask; log-softmax in float64.
    """
    rows = [(list(e["input_ids"]), list(e["labels"])) for e in examples]
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            input_ids = torch.zeros((len(chunk), width), dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
            for i, (ids, lab) in enumerate(chunk):
                if len(ids) != len(lab):
                    raise ValueError(f"example {start + i}: input_ids and labels differ in length")
                input_ids[i, : len(ids)] = torch.tensor(ids)
                attention_mask[i, : len(ids)] = 1
                labels[i, : len(lab)] = torch.tensor(lab)
            logits = _logits(model, input_ids, attention_mask)
            targets = labels[:, 1:].to(logits.device)
            scored = targets != IGNORE_INDEX
            if not scored.any():
                continue
            picked = logits[:, :-1][scored].double()  # (n, vocab): scored positions only, on device
            log_probs = torch.log_softmax(picked, dim=-1)
            nll = -log_probs.gather(1, targets[scored].unsqueeze(1)).squeeze(1)
            total += float(nll.sum())
            count += int(scored.sum())
    return total, count


def perplexity(nll: float, count: int) -> float:
    """exp(mean NLL); inf when nothing was scored."""
    return math.exp(nll / count) if count else math.inf


def first_step_logits(model, tokenizer, prompts: Sequence[str]) -> list[np.ndarray]:
    """fp32 logits (seq_len, vocab) of each prompt at batch 1: for ONNX vs PyTorch parity."""
    result = []
    with torch.inference_mode():
        for prompt in prompts:
            batch = encode_prompt(tokenizer, prompt)
            logits = _logits(model, batch["input_ids"], batch["attention_mask"])
            result.append(logits[0].cpu().numpy().astype(np.float32))
    return result


def token_agreement(reference: list[list[int]], other: list[list[int]]) -> float:
    """Share of reference positions where `other` has the same token.

    The denominator is the total reference length; positions `other` lacks (shorter answer)
    count as disagreements, tokens it has beyond the reference length are not scored.
    """
    if len(reference) != len(other):
        raise ValueError(f"{len(reference)} reference answers but {len(other)} to compare")
    total = sum(len(ref) for ref in reference)
    if total == 0:
        return 1.0 if all(not o for o in other) else 0.0
    pairs = zip(reference, other, strict=True)
    same = sum(a == b for ref, o in pairs for a, b in zip(ref, o, strict=False))
    return same / total
