"""Saving and loading adapters: round trips, the files on disk, and every load error."""

from __future__ import annotations

import json
import re

import pytest
import torch
from lora_helpers import input_ids, logits, randomize_trainable, tiny_bert, tiny_gpt2, tiny_llama
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertForSequenceClassification

from lora_core import (
    LoraConfig,
    LoraError,
    inject_lora,
    load_adapter,
    lora_state_dict,
    read_adapter_config,
    save_adapter,
)
from lora_core.layers import LoraLayer

QA = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"


def trained_bert(tmp_path, **cfg) -> tuple[torch.nn.Module, LoraConfig]:
    model = tiny_bert()
    config = LoraConfig(**{"r": 8, "target_modules": ["query", "value"], **cfg})
    inject_lora(model, config)
    randomize_trainable(model, std=0.3)
    return model, config


def test_round_trip(tmp_path) -> None:
    model, config = trained_bert(tmp_path, modules_to_save=["classifier"], bias="lora_only")
    out = save_adapter(model, tmp_path / "a", base_model_name_or_path="tiny-bert")
    assert out == tmp_path / "a"
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    on_disk = load_file(out / "adapter_model.safetensors")
    assert set(on_disk) == set(lora_state_dict(model))

    fresh = tiny_bert()
    loaded = load_adapter(fresh, out, is_trainable=True)
    assert loaded == config
    ids = input_ids()
    torch.testing.assert_close(logits(fresh, ids), logits(model, ids), rtol=0, atol=0)
    trainable = {n for n, p in fresh.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in model.named_parameters() if p.requires_grad}


def test_config_json_fields(tmp_path) -> None:
    model = tiny_gpt2()
    inject_lora(model, LoraConfig(r=2, alpha=4, target_modules="all-linear", init="gaussian"))
    save_adapter(model, tmp_path, base_model_name_or_path="gpt2", task_type="CAUSAL_LM")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (2, 4, 0.0)
    assert cfg["fan_in_fan_out"] is True  # GPT-2's Conv1D
    assert cfg["init_lora_weights"] == "gaussian" and cfg["bias"] == "none"
    assert cfg["base_model_name_or_path"] == "gpt2" and cfg["inference_mode"] is True
    assert cfg["target_modules"] == sorted(
        f"transformer.h.{i}.{n}"
        for i in range(2)
        for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    )
    assert read_adapter_config(tmp_path).target_modules == cfg["target_modules"]


def test_seq_cls_saves_the_head(tmp_path) -> None:
    model, _ = trained_bert(tmp_path)
    with torch.no_grad():
        model.classifier.weight.normal_()
    save_adapter(model, tmp_path, base_model_name_or_path="", task_type="SEQ_CLS")
    assert read_adapter_config(tmp_path).modules_to_save == ["classifier"]
    assert "base_model.model.classifier.weight" in load_file(tmp_path / "adapter_model.safetensors")
    fresh = tiny_bert()
    load_adapter(fresh, tmp_path)
    torch.testing.assert_close(fresh.classifier.weight, model.classifier.weight)
    with pytest.raises(LoraError, match=r"^task_type must be one of \['CAUSAL_LM', "):
        save_adapter(model, tmp_path, base_model_name_or_path="", task_type="seq-cls")


def test_embedding_base_weight_saved_like_peft(tmp_path) -> None:
    model = tiny_llama()
    inject_lora(model, LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"]))
    keys = set(lora_state_dict(model))
    assert "base_model.model.model.embed_tokens.base_layer.weight" in keys
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in keys


# ------------------------------------------------------------------------------------- errors


def _assert_untouched(model: torch.nn.Module) -> None:
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    assert not hasattr(model, "_lora_config")
    assert all(p.requires_grad for p in model.parameters())


def test_missing_files(tmp_path) -> None:
    msg = (
        f"no adapter_config.json in {tmp_path}: expected a PEFT LoRA adapter folder "
        "(adapter_config.json + adapter_model.safetensors), e.g. one written by save_adapter"
    )
    with pytest.raises(LoraError, match=f"^{re.escape(msg)}$"):
        load_adapter(tiny_bert(), tmp_path)

    model, _ = trained_bert(tmp_path)
    save_adapter(model, tmp_path, base_model_name_or_path="")
    (tmp_path / "adapter_model.safetensors").rename(tmp_path / "adapter_model.bin")
    msg = (
        f"no adapter_model.safetensors in {tmp_path} (found adapter_model.bin, a pickle file "
        "lora_core "
        "will not load: re-save it as safetensors): expected a PEFT LoRA adapter folder "
        "(adapter_config.json + adapter_model.safetensors), e.g. one written by save_adapter"
    )
    fresh = tiny_bert()
    with pytest.raises(LoraError, match=f"^{re.escape(msg)}$"):
        load_adapter(fresh, tmp_path)
    _assert_untouched(fresh)


def test_corrupt_safetensors(tmp_path) -> None:
    model, _ = trained_bert(tmp_path)
    save_adapter(model, tmp_path, base_model_name_or_path="")
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    fresh = tiny_bert()
    with pytest.raises(LoraError) as err:
        load_adapter(fresh, tmp_path)
    assert str(err.value).startswith(f"could not read {path} (")
    assert str(err.value).endswith("): the file is corrupt or not safetensors, re-save the adapter")
    _assert_untouched(fresh)


def test_corrupt_config(tmp_path) -> None:
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(
        LoraError, match=r"adapter_config.json is not valid JSON \(.*\): re-save the adapter$"
    ):
        read_adapter_config(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 0}))
    with pytest.raises(
        LoraError, match=r"adapter_config.json: lora.r must be a positive integer, got 0"
    ):
        read_adapter_config(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(LoraError, match=r"is a IA3 adapter, lora_core reads only LORA adapters$"):
        read_adapter_config(tmp_path)
    cfg = {"peft_type": "LORA", "r": 4, "target_modules": ["query"], "use_dora": True}
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoraError, match=r"sets use_dora=True, which lora_core does not support"):
        read_adapter_config(tmp_path)


def test_shape_mismatch_names_key_and_shapes(tmp_path) -> None:
    torch.manual_seed(0)
    wide = BertForSequenceClassification(
        BertConfig(
            vocab_size=100,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
            num_labels=3,
        )
    )
    inject_lora(wide, LoraConfig(r=8, target_modules=["query", "value"]))
    save_adapter(wide, tmp_path, base_model_name_or_path="")
    fresh = tiny_bert()
    msg = (
        f"adapter for a different base model? {QA} has shape (8, 64) in the adapter "
        "but (8, 32) in the model"
    )
    with pytest.raises(LoraError, match=f"^{re.escape(msg)}$"):
        load_adapter(fresh, tmp_path)
    _assert_untouched(fresh)


def test_missing_and_unexpected_keys(tmp_path) -> None:
    model, _ = trained_bert(tmp_path)
    save_adapter(model, tmp_path, base_model_name_or_path="")
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors["base_model.model.extra.weight"] = tensors.pop(QA)
    save_file(tensors, path)
    fresh = tiny_bert()
    msg = (
        f"{path} does not fit the model (missing keys: {QA}; unexpected keys: "
        "base_model.model.extra.weight): adapter for a different base model or LoRA config?"
    )
    with pytest.raises(LoraError, match=f"^{re.escape(msg)}$"):
        load_adapter(fresh, tmp_path)
    _assert_untouched(fresh)


def test_load_into_model_with_lora(tmp_path) -> None:
    model, _ = trained_bert(tmp_path)
    save_adapter(model, tmp_path, base_model_name_or_path="")
    with pytest.raises(LoraError, match="already holds LoRA layers"):
        load_adapter(model, tmp_path)
