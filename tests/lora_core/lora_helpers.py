"""Shared builders for the lora_core tests: tiny random HF models, a toy model, input ids.

Kept as a plain module (not conftest.py) so it cannot clash with other test folders.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # peft's save_pretrained may probe the hub otherwise

import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.pytorch_utils import Conv1D  # noqa: E402

VOCAB = 100


def tiny_bert() -> nn.Module:
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        num_labels=3,
    )
    return BertForSequenceClassification(cfg).eval()


def tiny_gpt2() -> nn.Module:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB)).eval()


def tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
    )
    return LlamaForCausalLM(cfg).eval()


MODELS = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama}


def input_ids(batch: int = 2, seq: int = 7, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def randomize_trainable(model: nn.Module, seed: int = 0, std: float = 0.1) -> None:
    """Give every trainable tensor (LoRA B included) random values so the adapter is non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)


class Toy(nn.Module):
    """Embedding -> Linear -> (Conv1D or Linear) -> head: every layer type lora_core wraps."""

    def __init__(self, vocab: int, d_in: int, hidden: int, d_out: int, conv1d: bool) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d_in)
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = Conv1D(d_out, hidden) if conv1d else nn.Linear(hidden, d_out)
        self.head = nn.Linear(d_out, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc2(torch.relu(self.fc1(self.emb(ids)))))


def peft_config(cfg, **extra):
    """PEFT's LoraConfig for the same LoRA as a lora_core LoraConfig (plus PEFT-only `extra`,
    e.g. task_type or fan_in_fan_out), through lora_core's one field translation."""
    import peft

    from lora_core.peft_format import to_peft_fields

    return peft.LoraConfig(**to_peft_fields(cfg), **extra)
