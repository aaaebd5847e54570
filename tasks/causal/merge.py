"""merge for causal_lm: a merged decoder folder that serves anywhere, with its parity gate.

The folder holds the merged weights (safetensors), config.json, the tokenizer with its special
tokens and chat template (the default one if the base had none), and generation_config.json
whose eos ids include the tokenizer's (so generation stops at the end of a turn). Losing the
tokenizer files, special tokens or chat template in a merge is a common failure elsewhere:
check_complete reloads the folder and compares each with what training used.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from transformers import AutoTokenizer, GenerationConfig

from tasks.causal.data import load_data_tokenizer, load_split
from tasks.causal.generation import eos_ids, first_step_logits
from tasks.causal.modeling import load_adapted_causal_lm, load_causal_lm
from tasks.config import PipelineConfig
from tasks.errors import ModelError
from tasks.gates import evaluate_gate, require
from tasks.merge import MergedModel, max_abs_diff, merge_and_unload
from tasks.prepare_data import PreparedData
from tasks.storage import stage_dir
from tasks.tracking import connect, log_folder, log_gate, stage_timer
from tasks.train_lora import TrainedAdapter

SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")


def probe_prompts(config: PipelineConfig, data: PreparedData) -> list[str]:
    """The rendered test prompts the merge and export gates compare models on."""
    test = load_split(data, "test")
    return list(test["prompt"][: config.export.parity_prompts])


def max_abs_diff_all(first: list[np.ndarray], second: list[np.ndarray]) -> float:
    if len(first) != len(second):
        return float("inf")
    return max((max_abs_diff(a, b) for a, b in zip(first, second, strict=True)), default=0.0)


def generation_config_for(model, tokenizer) -> GenerationConfig:
    """The base's generation config, with pad and the tokenizer's eos added to the stop ids."""
    generation = model.generation_config
    stop_ids = eos_ids(model, tokenizer)
    generation.eos_token_id = stop_ids[0] if len(stop_ids) == 1 else stop_ids
    if generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id
    return generation


def check_complete(folder: Path, tokenizer) -> None:
    """Reload the saved folder's tokenizer and generation config; raise if anything was lost."""
    problems = []
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        problems.append("config.json or *.safetensors weights are missing")
    saved = AutoTokenizer.from_pretrained(str(folder))
    if saved.chat_template != tokenizer.chat_template:
        problems.append("the chat template differs from the one training used")
    for name in SPECIAL_TOKENS:
        if getattr(saved, name) != getattr(tokenizer, name):
            problems.append(f"{name} is {getattr(saved, name)!r}, not {getattr(tokenizer, name)!r}")
    if saved.get_vocab() != tokenizer.get_vocab():
        problems.append("the vocabulary differs")
    try:
        generation = GenerationConfig.from_pretrained(str(folder))
    except OSError:
        problems.append("generation_config.json is missing")
    else:
        eos = generation.eos_token_id
        if tokenizer.eos_token_id not in ([eos] if isinstance(eos, int) else (eos or [])):
            problems.append(f"generation_config eos_token_id {eos!r} lacks the tokenizer's eos")
    if problems:
        raise ModelError(f"merged model folder {folder} is incomplete: {'; '.join(problems)}")


def merge_causal(
    config: PipelineConfig, data: PreparedData, trained: TrainedAdapter, run_id: str
) -> MergedModel:
    """Merge safely, save the complete folder, reload it, gate on logits parity with the adapter."""
    connect(config.tracking)
    with stage_timer(run_id, "merge"):
        tokenizer = load_data_tokenizer(data)
        prompts = probe_prompts(config, data)
        model = load_adapted_causal_lm(config.model, trained.adapter.fetch())
        adapter_logits = first_step_logits(model, tokenizer, prompts)
        plain = merge_and_unload(model)
        plain.generation_config = generation_config_for(plain, tokenizer)
        out_dir = stage_dir(config, run_id, "merged_model")
        plain.save_pretrained(str(out_dir), safe_serialization=True)
        tokenizer.save_pretrained(str(out_dir))
        check_complete(out_dir, tokenizer)
        merged_logits = first_step_logits(load_causal_lm(str(out_dir)).eval(), tokenizer, prompts)
        gate = log_gate(
            run_id,
            evaluate_gate(
                "merge_parity_max_abs_diff",
                max_abs_diff_all(merged_logits, adapter_logits),
                config.merge.parity_max_abs_diff,
                "<=",
            ),
        )
        require(gate)
        ref = log_folder(run_id, out_dir, "merged_model")
    return MergedModel(model=ref, parity=gate)
