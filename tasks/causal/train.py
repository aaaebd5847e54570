"""train for causal_lm: LoRA on the decoder, loss on the response tokens only.

Labels come from prepare_data (-100 outside assistant turns). Packed rows (fixed length,
position ids, no attention mask) are stacked as they are; other examples are padded per batch,
labels with -100. The loss is the decoder's own, normalized by the response tokens of the
whole global batch (the Trainer's num_items_in_batch), so every world size trains alike.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, DataCollatorForSeq2Seq, default_data_collator

from tasks.causal.data import TOKENIZER_DIR
from tasks.causal.formatting import IGNORE_INDEX
from tasks.causal.modeling import build_causal_lora_model
from tasks.common.config import PipelineConfig
from tasks.common.training import TrainingSetup, pad_multiple, pick_device, pick_precision


def causal_collator(tokenizer, pad_to_multiple_of: int | None = None):
    """Packed rows are stacked as they are; other examples padded (to the longest, or to a
    multiple of pad_to_multiple_of), labels with -100."""
    padded = DataCollatorForSeq2Seq(
        tokenizer,
        padding=True,
        pad_to_multiple_of=pad_to_multiple_of,
        label_pad_token_id=IGNORE_INDEX,
    )

    def collate(features):
        return (
            default_data_collator(features) if "position_ids" in features[0] else padded(features)
        )

    return collate


def training_setup(config: PipelineConfig, data_dir: Path) -> TrainingSetup:
    """LoRA on the decoder, with the tokenizer (and chat template) prepare_data saved."""
    tokenizer = AutoTokenizer.from_pretrained(str(data_dir / TOKENIZER_DIR))
    device = pick_device(config.train)
    precision = pick_precision(config.train, device)
    model, report = build_causal_lora_model(config.model, config.lora, device, precision)
    return TrainingSetup(
        model=model,
        report=report,
        tokenizer=tokenizer,
        collator=causal_collator(tokenizer, pad_multiple(precision)),
        compute_metrics=None,
        task_type="CAUSAL_LM",
    )


def search_objective(config: PipelineConfig) -> tuple[str, str]:
    """Validation loss (mean per response token), lower is better: ROUGE-L would need greedy
    generation at every evaluation, which costs more than the training it scores."""
    del config
    return "loss", "minimize"
