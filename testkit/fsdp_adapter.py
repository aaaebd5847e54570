"""`torchrun --nproc-per-node 2 -m testkit.fsdp_adapter OUT`: a LoRA BERT sharded with FSDP2
(torch's fully_shard, gloo on CPU), one training step, then the adapter gathered from the
shards and saved by rank 0 (lora_core.adapter_tensors + save_adapter), as the train stage does
under strategy fsdp. Rank 0 also saves the same model unsharded, trained on the same global
batch, for the test to compare (tests/test_distributed.py)."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import BertConfig, BertForSequenceClassification

from lora_core import LoraConfig, adapter_tensors, inject_lora, save_adapter

CONFIG = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=37, num_labels=3, hidden_dropout_prob=0.0,
              attention_probs_dropout_prob=0.0)  # fmt: skip


def step(model, ids, labels) -> None:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(input_ids=ids, labels=labels).loss.backward()
    optimizer.step()


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**CONFIG))
    base = str(out / "base")
    if rank == 0:
        model.save_pretrained(base)
    inject_lora(model, LoraConfig(r=4, alpha=8, target_modules=["query", "value"]))
    reference = copy.deepcopy(model)
    ids = torch.randint(5, 50, (4 * world, 12), generator=torch.Generator().manual_seed(1))
    labels = ids[:, 0] % 3
    for layer in model.bert.encoder.layer:
        fully_shard(layer)
    fully_shard(model)
    mine = slice(4 * rank, 4 * rank + 4)  # this rank's share of the global batch
    step(model, ids[mine], labels[mine])
    tensors = adapter_tensors(model, "SEQ_CLS")  # every rank: a collective
    if rank == 0:
        save_adapter(model, out / "fsdp", base_model_name_or_path=base, task_type="SEQ_CLS",
                     tensors=tensors)  # fmt: skip
        step(reference, ids, labels)  # one process, the whole global batch
        save_adapter(reference, out / "single", base_model_name_or_path=base, task_type="SEQ_CLS")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
