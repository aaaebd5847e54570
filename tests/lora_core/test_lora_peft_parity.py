"""lora_core against peft (the oracle) on tiny random BERT, GPT-2 and Llama models.

For each config: the same A/B weights give the same logits; lora_state_dict has exactly
peft's key set; an adapter saved by lora_core loads in peft and vice versa.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from lora_helpers import MODELS, input_ids, logits, peft_config, randomize_trainable
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from lora_core import (
    LoraConfig,
    count_parameters,
    inject_lora,
    load_adapter,
    lora_state_dict,
    save_adapter,
)

CASES = {
    "bert-qv": ("bert", LoraConfig(r=4, alpha=16, target_modules=["query", "value"]), "SEQ_CLS"),
    "bert-rslora-bias_all-mts": (
        "bert",
        LoraConfig(
            r=4,
            alpha=8,
            target_modules=["query", "value"],
            use_rslora=True,
            bias="all",
            modules_to_save=["classifier"],
        ),
        None,
    ),
    "bert-lora_only-gaussian": (
        "bert",
        LoraConfig(
            r=2, alpha=4, target_modules=["key", "dense"], bias="lora_only", init="gaussian"
        ),
        None,
    ),
    "bert-all_linear-mts": (
        "bert",
        LoraConfig(r=4, target_modules="all-linear", modules_to_save=["classifier"]),
        None,
    ),
    "bert-regex-exclude": (
        "bert",
        LoraConfig(
            r=3,
            target_modules=r".*layer\.\d\.attention\.self\.(query|value)",
            exclude_modules=["layer.0.attention.self.value"],
        ),
        None,
    ),
    "gpt2-conv1d-embedding": (
        "gpt2",
        LoraConfig(r=4, target_modules=["c_attn", "c_fc", "wte"]),
        None,
    ),
    "gpt2-all_linear": (
        "gpt2",
        LoraConfig(r=2, alpha=32, target_modules="all-linear"),
        "CAUSAL_LM",
    ),
    "llama-embed_tokens-rslora": (
        "llama",
        LoraConfig(
            r=4, target_modules=["embed_tokens", "q_proj", "v_proj"], dropout=0.1, use_rslora=True
        ),
        None,
    ),
    "llama-all_linear": ("llama", LoraConfig(r=4, target_modules="all-linear"), None),
}


def peft_only(key: str) -> bool:
    """Keys peft writes for its ModulesToSaveWrapper internals under bias='all' (see io.py)."""
    return ".modules_to_save." in key or ".original_module." in key


@pytest.fixture(scope="module")
def bases() -> dict[str, torch.nn.Module]:
    return {name: make() for name, make in MODELS.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_peft(case: str, bases: dict, tmp_path) -> None:
    model_name, cfg, task_type = CASES[case]
    base = bases[model_name]
    ids = input_ids()
    base_logits = logits(base, ids)

    ours = copy.deepcopy(base)
    inject_lora(ours, cfg)
    randomize_trainable(ours, seed=list(CASES).index(case), std=0.5)
    ours.eval()
    expected = logits(ours, ids)
    assert (expected - base_logits).abs().max() > 1e-3  # the adapter really does something

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # 1. same weights, same logits; same key set as peft's own state dict
        theirs = get_peft_model(
            copy.deepcopy(base), peft_config(cfg, fan_in_fan_out=model_name == "gpt2")
        )
        ours_sd = lora_state_dict(ours)
        assert set(ours_sd) == {k for k in get_peft_model_state_dict(theirs) if not peft_only(k)}
        result = set_peft_model_state_dict(theirs, ours_sd)
        assert not result.unexpected_keys
        assert count_parameters(ours)[0] == theirs.get_nb_trainable_parameters()[0]
        theirs.eval()
        torch.testing.assert_close(logits(theirs, ids), expected, rtol=1e-5, atol=1e-5)

        # 2. saved by lora_core, loaded by peft
        save_adapter(ours, tmp_path / "ours", base_model_name_or_path="", task_type=task_type)
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
        torch.testing.assert_close(logits(loaded, ids), expected, rtol=1e-5, atol=1e-5)

        # 3. saved by peft, loaded by lora_core
        theirs.save_pretrained(tmp_path / "theirs")
    fresh = copy.deepcopy(base)
    got = load_adapter(fresh, tmp_path / "theirs")
    torch.testing.assert_close(logits(fresh, ids), expected, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in fresh.parameters()) and not fresh.training
    assert (got.r, got.alpha, got.bias, got.use_rslora, got.init) == (
        cfg.r,
        cfg.alpha,
        cfg.bias,
        cfg.use_rslora,
        cfg.init,
    )
    assert got.modules_to_save == cfg.modules_to_save
