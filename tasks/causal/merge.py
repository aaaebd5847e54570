"""merge for causal_lm: a merged decoder folder that serves anywhere, with its parity gate.

The folder holds the merged weights (safetensors), config.json, the tokenizer with its special
tokens and chat template (the default one if the base had none), and generation_config.json
whose eos ids include the tokenizer's (so generation stops at the end of a turn). Losing the
tokenizer files, special tokens or chat template in a merge is a common failure elsewhere:
check_complete reloads the folder and compares each with what training used.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from transformers import AutoTokenizer, GenerationConfig

from tasks.causal.data import load_data_tokenizer, load_split
from tasks.causal.generation import eos_ids, first_step_logits
from tasks.causal.modeling import load_adapted_causal_lm, load_causal_lm
from tasks.common.errors import ModelError
from tasks.common.merging import merge_checked
from tasks.common.onnx import max_abs_diff_all
from tasks.common.stage import StageContext
from tasks.records import MergedModel, PreparedData, TrainedAdapter

SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")


def probe_prompts(stage: StageContext, data: PreparedData) -> list[str]:
    """The rendered test prompts the merge and export gates compare models on."""
    test = load_split(stage, data, "test")
    return list(test["prompt"][: stage.config.export.parity_prompts])


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


def merge(stage: StageContext, data: PreparedData, trained: TrainedAdapter) -> MergedModel:
    """Merge safely, save the complete folder, reload it, gate on logits parity with the adapter."""
    tokenizer = load_data_tokenizer(stage, data)

    def save(model, folder: Path) -> None:
        model.generation_config = generation_config_for(model, tokenizer)
        model.save_pretrained(str(folder), safe_serialization=True)
        tokenizer.save_pretrained(str(folder))
        check_complete(folder, tokenizer)

    ref, gate = merge_checked(
        stage,
        load_adapted_causal_lm(stage.config.model, stage.fetch(trained.adapter)),
        outputs=partial(first_step_logits, tokenizer=tokenizer, prompts=probe_prompts(stage, data)),
        difference=max_abs_diff_all,
        save=save,
        reload=lambda folder: load_causal_lm(str(folder)).eval(),
    )
    return MergedModel(model=ref, parity=gate)
