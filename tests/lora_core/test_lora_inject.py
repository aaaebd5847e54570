"""Injection, freezing, merge/unmerge/unload and their error messages on tiny HF models."""

import re

import pytest
import torch
from lora_helpers import input_ids, logits, randomize_trainable, tiny_bert, tiny_gpt2, tiny_llama
from torch import nn

from lora_core import (
    InjectionReport,
    LoraConfig,
    LoraError,
    count_parameters,
    inject_lora,
    lora_state_dict,
    merge_lora,
    unload_lora,
    unmerge_lora,
)
from lora_core.layers import LoraEmbedding, LoraLayer, LoraLinear

Q0 = "bert.encoder.layer.0.attention.self.query"


def test_inject_bert_query_value() -> None:
    model = tiny_bert()
    report = inject_lora(model, LoraConfig(r=4, target_modules=["query", "value"]))
    assert isinstance(report, InjectionReport)
    assert report.target_names == [
        f"bert.encoder.layer.{i}.attention.self.{n}" for i in range(2) for n in ("query", "value")
    ]
    assert report.trainable_params == 4 * 4 * (32 + 32)
    assert (report.trainable_params, report.total_params) == count_parameters(model)
    assert 0 < report.trainable_fraction < 0.1
    layer = model.get_submodule(Q0)
    assert isinstance(layer, LoraLinear) and isinstance(layer.base_layer, nn.Linear)
    assert layer.lora_A.weight.shape == (4, 32) and layer.lora_B.weight.shape == (32, 4)
    assert not layer.base_layer.weight.requires_grad and not layer.base_layer.bias.requires_grad
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{t}.lora_{ab}.weight" for t in report.target_names for ab in "AB"}
    assert f"{Q0}.lora_A.weight" in model.state_dict()  # PEFT's on-disk names, no ModuleDict


def test_regex_targets_and_exclude() -> None:
    model = tiny_bert()
    cfg = LoraConfig(
        r=2, target_modules=r".*\.(query|key)", exclude_modules=["layer.1.attention.self.key"]
    )
    names = inject_lora(model, cfg).target_names
    assert names == [
        Q0,
        "bert.encoder.layer.0.attention.self.key",
        "bert.encoder.layer.1.attention.self.query",
    ]


def test_all_linear_skips_heads_and_modules_to_save() -> None:
    bert = tiny_bert()
    names = inject_lora(bert, LoraConfig(r=2, target_modules="all-linear")).target_names
    assert "classifier" not in names and "bert.pooler.dense" in names and len(names) == 2 * 6 + 1
    gpt2 = tiny_gpt2()
    names = inject_lora(gpt2, LoraConfig(r=2, target_modules="all-linear")).target_names
    assert (
        "lm_head" not in names and len(names) == 2 * 4
    )  # c_attn, c_proj, c_fc, mlp.c_proj (Conv1D)
    llama = tiny_llama()
    names = inject_lora(llama, LoraConfig(r=2, target_modules="all-linear")).target_names
    assert "lm_head" not in names and len(names) == 2 * 7


def test_modules_to_save_and_bias_modes() -> None:
    model = tiny_bert()
    cfg = LoraConfig(
        r=2, target_modules=["query"], modules_to_save=["classifier"], bias="lora_only"
    )
    report = inject_lora(model, cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias", f"{Q0}.base_layer.bias"} <= trainable
    assert "bert.encoder.layer.0.attention.self.key.bias" not in trainable
    assert isinstance(model.classifier, nn.Linear)  # kept in place, not wrapped
    assert report.trainable_params == 2 * 2 * 64 + 32 * 3 + 3 + 2 * 32

    model = tiny_bert()
    inject_lora(model, LoraConfig(r=2, target_modules=["query"], bias="all"))
    biases = {n for n, p in model.named_parameters() if n.endswith(".bias")}
    assert biases and all(p.requires_grad for n, p in model.named_parameters() if n in biases)
    assert not any(
        p.requires_grad for n, p in model.named_parameters() if n.endswith("LayerNorm.weight")
    )


def test_embedding_target() -> None:
    model = tiny_llama()
    inject_lora(model, LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]))
    emb = model.model.embed_tokens
    assert isinstance(emb, LoraEmbedding)
    assert emb.lora_embedding_A.shape == (4, 100) and emb.lora_embedding_B.shape == (32, 4)
    assert model.get_input_embeddings() is emb


def test_dtype_and_rslora_scaling() -> None:
    model = tiny_bert().to(torch.bfloat16)
    inject_lora(model, LoraConfig(r=4, alpha=8, target_modules=["query"], use_rslora=True))
    layer = model.get_submodule(Q0)
    assert layer.lora_A.weight.dtype == torch.bfloat16 and layer.scaling == 8 / 2
    assert logits(model, input_ids()).dtype == torch.bfloat16


def test_gaussian_init() -> None:
    torch.manual_seed(0)
    model = tiny_bert()
    inject_lora(model, LoraConfig(r=8, target_modules=["query"], init="gaussian"))
    a = model.get_submodule(Q0).lora_A.weight
    assert abs(a.std().item() - 1 / 8) < 0.03 and torch.all(
        model.get_submodule(Q0).lora_B.weight == 0
    )


def test_unload_equals_merged() -> None:
    model = tiny_bert()
    inject_lora(model, LoraConfig(r=4, target_modules=["query", "value", "dense"]))
    randomize_trainable(model)
    ids = input_ids()
    adapted = logits(model, ids)
    merge_lora(model)
    merged = logits(model, ids)
    plain = unload_lora(model)
    assert not any(isinstance(m, LoraLayer) for m in plain.modules())
    assert not hasattr(plain, "_lora_config")
    assert isinstance(plain.get_submodule(Q0), nn.Linear)
    torch.testing.assert_close(logits(plain, ids), merged, rtol=0, atol=0)
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)


def test_unload_without_merge_restores_base() -> None:
    base = tiny_bert()
    ids = input_ids()
    expected = logits(base, ids)
    inject_lora(base, LoraConfig(r=4, target_modules=["query"]))
    randomize_trainable(base)
    merge_lora(base)
    plain = unload_lora(base, merge=False)
    torch.testing.assert_close(logits(plain, ids), expected, rtol=1e-5, atol=1e-6)


def test_double_merge_and_unmerge_warn() -> None:
    model = tiny_bert()
    inject_lora(model, LoraConfig(r=4, target_modules=["query"]))
    randomize_trainable(model)
    weight = model.get_submodule(Q0).base_layer.weight
    merge_lora(model)
    once = weight.clone()
    with pytest.warns(UserWarning, match="nothing to do"):
        merge_lora(model)
    assert torch.equal(weight, once)
    unmerge_lora(model)
    with pytest.warns(UserWarning, match="nothing to do"):
        unmerge_lora(model)


def test_safe_merge_rejects_inf_and_leaves_base_untouched() -> None:
    model = tiny_bert()
    inject_lora(model, LoraConfig(r=4, target_modules=["query", "value"]))
    randomize_trainable(model)
    bad = "bert.encoder.layer.1.attention.self.value"
    with torch.no_grad():
        model.get_submodule(bad).lora_B.weight.fill_(float("inf"))
    before = {n: p.clone() for n, p in model.named_parameters() if "base_layer" in n}
    msg = (
        f"merging LoRA into {bad} gives inf/NaN weights: the adapter is broken (diverged "
        "training?). "
        "No base weight was changed."
    )
    with pytest.raises(LoraError, match=f"^{re.escape(msg)}$"):
        merge_lora(model)
    with pytest.raises(LoraError, match=re.escape(bad)):
        unload_lora(model)
    for n, p in model.named_parameters():
        if "base_layer" in n:
            assert torch.equal(p, before[n]), n
    assert not any(m.merged for m in model.modules() if isinstance(m, LoraLayer))


def test_lora_state_dict_keys() -> None:
    model = tiny_bert()
    inject_lora(model, LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]))
    assert sorted(lora_state_dict(model)) == sorted(
        [
            f"base_model.model.bert.encoder.layer.{i}.attention.self.query.lora_{ab}.weight"
            for i in range(2)
            for ab in "AB"
        ]
        + ["base_model.model.classifier.weight", "base_model.model.classifier.bias"]
    )


# ----------------------------------------------------------------------------------------- errors


def test_pattern_matching_nothing() -> None:
    model = tiny_bert()
    with pytest.raises(LoraError) as err:
        inject_lora(model, LoraConfig(target_modules=["qury"]))
    layers = [
        "bert.embeddings.word_embeddings",
        "bert.embeddings.position_embeddings",
        "bert.embeddings.token_type_embeddings",
    ]
    for i in range(2):
        layers += [f"bert.encoder.layer.{i}.attention.self.{n}" for n in ("query", "key", "value")]
        layers += [
            f"bert.encoder.layer.{i}.{n}.dense"
            for n in ("attention.output", "intermediate", "output")
        ]
    layers += ["bert.pooler.dense", "classifier"]
    assert str(err.value) == (
        "lora.target_modules ['qury'] matched no layer of BertForSequenceClassification. "
        f"Layers that can take LoRA: {', '.join(layers)}. Fix target_modules to name some of them."
    )
    assert not any(isinstance(m, LoraLayer) for m in model.modules())


def test_r_too_large() -> None:
    model = tiny_bert()
    msg = (
        f"lora.r=33 is too large for {Q0}, a Linear with weight shape (32, 32): r must be at most "
        "32 "
        "there. Lower r or leave that layer out via exclude_modules."
    )
    with pytest.raises(LoraError, match=f"^{re.escape(msg)}$"):
        inject_lora(model, LoraConfig(r=33, target_modules=["query"]))
    assert all(p.requires_grad for p in model.parameters())  # untouched


def test_double_injection() -> None:
    model = tiny_bert()
    inject_lora(model, LoraConfig(r=2))
    msg = (
        f"BertForSequenceClassification already holds LoRA layers (e.g. {Q0}): call "
        "unload_lora(model) "
        "first, or inject into a fresh base model"
    )
    with pytest.raises(LoraError, match=f"^{re.escape(msg)}$"):
        inject_lora(model, LoraConfig(r=2))


def test_unsupported_type_by_name() -> None:
    with pytest.raises(
        LoraError,
        match=r"^lora.target_modules matched model.layers.0.mlp, a LlamaMLP, "
        r"which cannot take LoRA \(supported: .*Name its layers such as "
        r"model.layers.0.mlp.gate_proj",
    ):
        inject_lora(tiny_llama(), LoraConfig(r=2, target_modules=["mlp"]))


def test_modules_to_save_matching_nothing() -> None:
    with pytest.raises(
        LoraError,
        match=r"^lora.modules_to_save entry 'clasifier' matched no module of "
        r"BertForSequenceClassification \(its top-level modules: bert, ",
    ):
        inject_lora(tiny_bert(), LoraConfig(r=2, modules_to_save=["clasifier"]))


def test_functions_need_lora() -> None:
    with pytest.raises(LoraError, match="holds no lora_core LoRA layers: call inject_lora"):
        lora_state_dict(tiny_bert())
