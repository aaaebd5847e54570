"""causal_lm on a CUDA device: packed rows under bf16 SDPA, and Trainer with bf16 + checkpointing.

Skipped without CUDA. Imports only torch, transformers, lora_core and the pure formatting module,
so the file also runs with a GPU machine's own Python (no MLflow or Prefect needed).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_core import LoraConfig, inject_lora
from tasks.causal.formatting import encode, pack
from testkit.tiny import build_tiny_decoder

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def decoder(tmp_path_factory, demo_frame):
    model_dir = build_tiny_decoder(tmp_path_factory.mktemp("gpu-llama"), list(demo_frame["text"]))
    return model_dir, AutoTokenizer.from_pretrained(model_dir), list(demo_frame["text"][:64])


def examples_of(tokenizer, texts, max_length):
    return [
        encode(
            tokenizer,
            [{"role": "user", "content": t}, {"role": "assistant", "content": "Team: billing"}],
            max_length,
        )
        for t in texts
    ]


def lora_decoder(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda()
    model.config.use_cache = False  # as tasks.causal.modeling.build_causal_lora_model does
    inject_lora(model, LoraConfig(r=8, alpha=16, target_modules="all-linear"))
    return model


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-4), (torch.bfloat16, 0.02)])
def test_packed_rows_keep_attention_within_examples_on_cuda(decoder, dtype, tolerance):
    """Packed logits equal each example's own (fp32: 1e-4; bf16: 2% of the largest logit),
    while the same row read as one sequence (no restarts) differs by far more."""
    model_dir, tokenizer, texts = decoder
    model = lora_decoder(model_dir).eval()
    rows = pack(examples_of(tokenizer, texts[:6], 128), 256, tokenizer.pad_token_id)
    row = next(r for r in rows if r["position_ids"].count(0) >= 3)  # two examples + padding
    ids = torch.tensor([row["input_ids"]]).cuda()
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        packed = model(input_ids=ids, position_ids=torch.tensor([row["position_ids"]]).cuda())
        packed = packed.logits[0].float()
        scale = packed.abs().max().item()
        one_sequence = model(input_ids=ids).logits[0].float()
        second = slice(starts[1], starts[2])
        leaked = (one_sequence[second] - packed[second]).abs().max().item()
        for start, end in zip(starts, starts[1:], strict=False):
            alone = model(input_ids=ids[:, start:end]).logits[0].float()
            diff = (packed[start:end] - alone).abs().max().item()
            assert diff <= tolerance * (scale if dtype != torch.float32 else 1.0), (start, diff)
    assert leaked > 10 * tolerance * scale  # the check can tell leaked attention apart


def test_trainer_bf16_with_gradient_checkpointing_trains_every_lora_weight(decoder, tmp_path):
    from transformers import Trainer, TrainingArguments, default_data_collator

    model_dir, tokenizer, texts = decoder
    model = lora_decoder(model_dir)
    rows = pack(examples_of(tokenizer, texts, 128), 256, tokenizer.pad_token_id)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=30,
        per_device_train_batch_size=4,
        learning_rate=0.01,
        bf16=True,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=5,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=rows, data_collator=default_data_collator
    )
    result = trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.5, losses
    assert result.global_step == 30
    unchanged = [n for n, p in model.named_parameters() if n in before and p.equal(before[n])]
    assert unchanged == [] and len(before) > 0
    assert all(p.dtype == torch.float32 for p in before.values())  # fp32 master weights
