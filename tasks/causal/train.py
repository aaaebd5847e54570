"""train for causal_lm: LoRA on the decoder, loss on the response tokens only.

Labels come from prepare_data (-100 outside assistant turns). Packed rows (fixed length,
position ids, no attention mask) are stacked as they are; other examples are padded per batch,
labels with -100.
"""

from __future__ import annotations

from datasets import load_from_disk
from transformers import DataCollatorForSeq2Seq, default_data_collator

from tasks.causal.data import load_data_tokenizer
from tasks.causal.formatting import IGNORE_INDEX
from tasks.causal.modeling import build_causal_lora_model
from tasks.common.stage import StageContext
from tasks.common.training import TrainingSetup, fit
from tasks.records import PreparedData, TrainedAdapter


def causal_collator(tokenizer):
    """Packed rows are stacked as they are; other examples padded, labels with -100."""
    padded = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)

    def collate(features):
        return (
            default_data_collator(features) if "position_ids" in features[0] else padded(features)
        )

    return collate


def train(stage: StageContext, data: PreparedData) -> TrainedAdapter:
    """Fine-tune LoRA on the training conversations; save and log the adapter."""
    config = stage.config
    dataset = load_from_disk(str(stage.fetch(data.dataset) / "tokenized"))

    def build() -> TrainingSetup:
        tokenizer = load_data_tokenizer(stage, data)  # with the chat template of the data
        model, report = build_causal_lora_model(config.model, config.lora)
        return TrainingSetup(
            model=model,
            report=report,
            tokenizer=tokenizer,
            collator=causal_collator(tokenizer),
            compute_metrics=None,
            task_type="CAUSAL_LM",
        )

    adapter_dir = stage.stage_dir("adapter")
    result = fit(stage, build, dataset, adapter_dir)
    ref = stage.run.log_folder(adapter_dir, "adapter")
    return TrainedAdapter(adapter=ref, **result.__dict__)
