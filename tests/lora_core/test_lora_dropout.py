"""lora_core.dropout: the cheaper CPU dropout mask, and the swap of a model's nn.Dropout."""

from __future__ import annotations

import math

import pytest
import torch
from lora_helpers import input_ids, tiny_bert
from torch import nn

from lora_core import LoraConfig, inject_lora, use_fast_dropout
from lora_core.dropout import Dropout, dropout, keep_mask
from lora_core.layers import LoraLinear

N = 1_000_000


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_drop_rate_and_scale(p: float) -> None:
    torch.manual_seed(0)
    x = torch.rand(N) + 1.0  # no zeros of its own
    out = dropout(x, p)
    kept = out != 0
    sigma = math.sqrt(p * (1 - p) / N)
    assert abs((1 - kept.float().mean().item()) - p) < 6 * sigma
    torch.testing.assert_close(out[kept], x[kept] / (1 - p))


def test_lanes_are_independent() -> None:
    """Four mask elements come from one 64-bit draw: neighbours must still be independent."""
    torch.manual_seed(0)
    keep = keep_mask(torch.Size([N]), 0.5).float()
    for lag in (1, 2, 3, 4):
        both = (keep[:-lag] * keep[lag:]).mean().item()
        assert abs(both - 0.25) < 6 * math.sqrt(0.25 * 0.75 / N), lag


def test_backward_uses_the_forward_mask() -> None:
    torch.manual_seed(1)
    x = (torch.rand(64, 48) + 1.0).requires_grad_()
    out = dropout(x, 0.3)
    grad = torch.randn_like(out)
    out.backward(grad)
    torch.testing.assert_close(x.grad, grad * (out != 0) / 0.7)


def test_seeded_and_fresh_per_call() -> None:
    x = torch.ones(4096)
    torch.manual_seed(3)
    first, second = dropout(x, 0.2), dropout(x, 0.2)
    torch.manual_seed(3)
    assert torch.equal(dropout(x, 0.2), first)
    assert not torch.equal(first, second)


def test_eval_zero_and_one() -> None:
    x = torch.randn(10, 10)
    assert dropout(x, 0.5, training=False) is x
    assert dropout(x, 0.0) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    assert dropout(x.bfloat16(), 0.5).dtype == torch.bfloat16


def test_module_keeps_nn_dropout_behaviour() -> None:
    module = Dropout(0.25)
    assert isinstance(module, nn.Dropout) and module.p == 0.25
    x = torch.randn(32, 32)
    module.eval()
    assert module(x) is x
    module.train()
    assert (module(x) == 0).any()
    inplace = Dropout(0.5, inplace=True)  # torch's own in-place path
    y = x.clone()
    assert inplace(y) is y


def test_swap_in_a_model() -> None:
    model = tiny_bert()
    plain = sum(type(m) is nn.Dropout for m in model.modules())
    assert plain > 0
    ids = input_ids()
    before = model(input_ids=ids).logits
    assert use_fast_dropout(model) == plain
    assert not any(type(m) is nn.Dropout for m in model.modules())
    assert sum(isinstance(m, Dropout) for m in model.modules()) == plain
    torch.testing.assert_close(model(input_ids=ids).logits, before)  # eval: no dropout
    model.train()
    torch.manual_seed(0)
    a = model(input_ids=ids).logits
    torch.manual_seed(0)
    assert torch.equal(model(input_ids=ids).logits, a)
    assert not torch.allclose(model(input_ids=ids).logits, a)


def test_lora_branch_dropout_is_the_cheap_one() -> None:
    model = tiny_bert()
    inject_lora(model, LoraConfig(r=4, target_modules=["query"], dropout=0.3))
    layer = model.bert.encoder.layer[0].attention.self.query
    assert isinstance(layer, LoraLinear) and type(layer.lora_dropout) is Dropout
    assert layer.lora_dropout.p == 0.3
