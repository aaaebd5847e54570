"""Training paths: gradient checkpointing, bf16 autocast on CPU, dropout, device placement."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from lora_helpers import input_ids, randomize_trainable, tiny_bert, tiny_llama
from torch import nn

from lora_core import LoraConfig, LoraError, inject_lora, merge_lora, unload_lora
from lora_core.layers import LoraLinear

CFG = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"])


def lora_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    ids = input_ids(seq=9)
    model.train()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("order", ["checkpointing-first", "lora-first"])
def test_gradient_checkpointing(order: str) -> None:
    reference = tiny_llama()
    inject_lora(reference, CFG)
    randomize_trainable(reference)
    expected = lora_grads(reference)

    model = tiny_llama()
    if order == "checkpointing-first":
        model.gradient_checkpointing_enable()  # HF default: reentrant checkpointing
    inject_lora(model, CFG)
    if order == "lora-first":
        model.gradient_checkpointing_enable()
    randomize_trainable(model)
    assert model.is_gradient_checkpointing
    grads = lora_grads(model)
    assert grads.keys() == expected.keys()
    for name, grad in grads.items():
        assert grad is not None, name
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-6)
    assert not any(p.grad is not None for n, p in model.named_parameters() if "lora_" not in n)


def test_bf16_autocast_cpu() -> None:
    model = tiny_llama()
    inject_lora(model, LoraConfig(r=4, target_modules="all-linear"))
    randomize_trainable(model)
    ids = input_ids()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.dtype == torch.float32, name
            assert torch.isfinite(p.grad).all(), name


def test_bf16_autocast_casts_a_frozen_weight_once() -> None:
    """Under CPU autocast the frozen base weight is cast once, not per forward; the output is
    what nn.Linear gives under autocast, and a merge (the weight changes) recasts it."""
    base = nn.Linear(16, 12)
    layer = LoraLinear(copy.deepcopy(base), r=4, alpha=8)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = base(x) + layer.lora_B(layer.lora_A(x) * layer.scaling)
        out = layer(x)
        cached = layer._cast_weight[1]
        layer(x)
        assert layer._cast_weight[1] is cached and cached.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected)
    assert set(layer.state_dict()) == {
        "base_layer.weight",
        "base_layer.bias",
        "lora_A.weight",
        "lora_B.weight",
    }
    layer.merge()
    merged = nn.Linear(16, 12)
    merged.load_state_dict({"weight": layer.base_layer.weight, "bias": base.bias})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(layer(x), merged(x))  # a stale cast would drop the delta
    assert layer.base_layer.weight.dtype == torch.float32


def test_bf16_model_merge_and_backward() -> None:
    model = tiny_bert().to(torch.bfloat16)
    inject_lora(model, LoraConfig(r=4, target_modules=["query", "value"]))
    randomize_trainable(model)
    ids = input_ids()
    model(input_ids=ids).logits.float().sum().backward()
    layer = model.bert.encoder.layer[0].attention.self.query
    assert layer.lora_B.weight.grad.dtype == torch.bfloat16
    merge_lora(model)
    assert layer.base_layer.weight.dtype == torch.bfloat16


def test_dropout_only_on_lora_branch() -> None:
    model = tiny_llama()
    inject_lora(model, LoraConfig(r=4, target_modules=["q_proj"], dropout=0.5))
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.lora_dropout, nn.Dropout) and layer.lora_dropout.p == 0.5
    inject = tiny_llama()
    inject_lora(inject, LoraConfig(r=4, target_modules=["q_proj"]))
    assert isinstance(inject.model.layers[0].self_attn.q_proj.lora_dropout, nn.Identity)
    x = torch.randn(3, 32)
    layer.train()
    with torch.no_grad():  # B = 0: dropout must not touch the base output
        torch.testing.assert_close(layer(x), layer.base_layer(x))


def test_disabled_layer_is_base() -> None:
    base = nn.Linear(8, 6)
    layer = LoraLinear(copy.deepcopy(base), r=2, alpha=4)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(4, 8)
    assert not torch.allclose(layer(x), base(x))
    layer.disabled = True
    torch.testing.assert_close(layer(x), base(x))


def test_candidate_list_is_truncated() -> None:
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(25)])
    shown = ", ".join(str(i) for i in range(20))
    msg = (
        f"lora.target_modules ['nope'] matched no layer of Sequential. Layers that can take LoRA: "
        f"{shown}, ... (5 more). Fix target_modules to name some of them."
    )
    with pytest.raises(LoraError, match=f"^{re.escape(msg)}$"):
        inject_lora(model, LoraConfig(target_modules=["nope"]))


def test_plain_module_round_trip() -> None:
    """No HF model needed: any nn.Module with Linear children works."""
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    report = inject_lora(model, LoraConfig(r=2, target_modules=["0", "2"]))
    assert report.target_names == ["0", "2"]
    randomize_trainable(model)
    x = torch.randn(4, 6)
    expected = model(x)
    plain = unload_lora(model)
    assert isinstance(plain[0], nn.Linear)
    torch.testing.assert_close(plain(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_placement() -> None:
    model = tiny_bert().cuda()
    inject_lora(model, LoraConfig(r=4, target_modules=["query", "value"]))
    randomize_trainable(model)
    layer = model.bert.encoder.layer[0].attention.self.query
    assert layer.lora_A.weight.is_cuda and layer.lora_B.weight.is_cuda
    ids = input_ids().cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(input_ids=ids).logits
    out.float().sum().backward()
    assert layer.lora_A.weight.grad.is_cuda
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        merge_lora(model)
        torch.testing.assert_close(model(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-4)
