"""Stage 2: train a LoRA adapter with transformers' Trainer.

sequence_classification trains LoRA plus the new classification head; causal_lm trains LoRA on
the decoder with the loss on response tokens only (labels from prepare_data).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from datasets import load_from_disk
from transformers import (
    DataCollatorForSeq2Seq,
    DataCollatorWithPadding,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

from lora_core import save_adapter
from tasks.config import PipelineConfig, TrainConfig
from tasks.errors import TrainingError
from tasks.metrics import classification_metrics
from tasks.modeling import build_lora_model, load_tokenizer, resolve_model_path
from tasks.prepare_data import PreparedData
from tasks.stage import stage_task
from tasks.storage import stage_dir
from tasks.tracking import ArtifactRef, connect, log_folder, log_metrics, set_tags, stage_timer

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "labels")


@dataclass(frozen=True)
class TrainedAdapter:
    """The adapter folder (PEFT format, head included) and how it was trained."""

    adapter: ArtifactRef
    device: str
    precision: str
    trainable_params: int
    total_params: int
    global_steps: int


def pick_device(train: TrainConfig) -> str:
    """cuda, then mps, then cpu (or what the config asks for)."""
    if train.device != "auto":
        return train.device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_precision(train: TrainConfig, device: str) -> str:
    """bf16 where the GPU supports it, else fp16 on GPU; fp32 on CPU."""
    if train.precision != "auto":
        return train.precision
    if device == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


class MlflowStepLogger(TrainerCallback):
    """Sends the Trainer's logs (loss, lr, grad norm, eval metrics) to the pipeline run."""

    def __init__(self, run_id: str):
        self.run_id = run_id

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or not state.is_world_process_zero:
            return
        metrics = {}
        for key, value in logs.items():
            if not isinstance(value, int | float) or key == "epoch":
                continue
            name = key[len("eval_") :] if key.startswith("eval_") else key
            prefix = "eval" if key.startswith("eval_") else "train"
            metrics[f"{prefix}.{name}"] = value
        if metrics:
            metrics["train.epoch"] = logs.get("epoch", state.epoch or 0.0)
            log_metrics(self.run_id, metrics, step=state.global_step)


class GuardedTrainer(Trainer):
    """Trainer that stops at the first NaN/inf loss instead of training on garbage."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TrainingError(
                f"training loss became {value} at step {self.state.global_step + 1}: lower "
                f"train.learning_rate, or use precision fp32 / bf16 instead of fp16"
            )
        return loss


def _compute_metrics(label_names):
    def compute(eval_pred):
        logits, labels = eval_pred
        return classification_metrics(
            labels, np.argmax(logits, axis=-1), label_names, per_class=False
        )

    return compute


def checkpoint_dir(config: PipelineConfig, run_id: str) -> Path:
    """Where this MLflow run's Trainer checkpoints live (durable, shared with GPU workers)."""
    root = config.train.checkpoint_dir or str(Path(config.output_dir) / "checkpoints")
    return Path(root) / run_id


def last_complete_checkpoint(folder: Path) -> str | None:
    """The newest checkpoint-N that was fully written (the Trainer writes trainer_state.json
    last), so a process killed while saving resumes from the one before."""
    if not folder.is_dir():
        return None
    steps = [
        (int(p.name.split("-")[1]), p)
        for p in folder.glob("checkpoint-*")
        if p.name.split("-")[1].isdigit() and (p / "trainer_state.json").is_file()
    ]
    return str(max(steps)[1]) if steps else None


def training_arguments(config: PipelineConfig, out_dir: Path, device: str, precision: str):
    train = config.train
    every = train.checkpoint_steps
    return TrainingArguments(
        output_dir=str(out_dir),
        num_train_epochs=train.epochs,
        max_steps=train.max_steps,
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=config.eval.batch_size,
        learning_rate=train.learning_rate,
        weight_decay=train.weight_decay,
        warmup_ratio=train.warmup_ratio,
        logging_steps=train.logging_steps,
        eval_strategy="epoch",
        save_strategy="steps" if every else "no",
        save_steps=every or 500,
        save_total_limit=2,  # the newest two: a crash while writing one leaves the other
        report_to=[],
        group_by_length=train.group_by_length,
        seed=train.seed,
        data_seed=train.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=device == "cpu",
        dataloader_num_workers=0,
        disable_tqdm=True,
        label_names=["labels"],
        gradient_checkpointing=train.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )


def causal_collator(tokenizer):
    """Packed rows (fixed length, position ids, no attention mask) are stacked as they are;
    other examples are padded per batch, labels with -100."""
    padded = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)

    def collate(features):
        return (
            default_data_collator(features) if "position_ids" in features[0] else padded(features)
        )

    return collate


def task_setup(config: PipelineConfig, data: PreparedData):
    """What differs between tasks: (model, report, tokenizer, collator, metrics fn, task type)."""
    if config.task == "causal_lm":
        from tasks.causal.data import load_data_tokenizer  # imported here: it imports this module
        from tasks.causal.modeling import build_causal_lora_model

        tokenizer = load_data_tokenizer(data)  # with the chat template the data was formatted by
        model, report = build_causal_lora_model(config.model, config.lora)
        return model, report, tokenizer, causal_collator(tokenizer), None, "CAUSAL_LM"
    tokenizer = load_tokenizer(config.model)
    model, report = build_lora_model(config.model, config.lora, data.label_names)
    collator = DataCollatorWithPadding(tokenizer)
    return model, report, tokenizer, collator, _compute_metrics(data.label_names), "SEQ_CLS"


def train_lora(config: PipelineConfig, data: PreparedData, run_id: str) -> TrainedAdapter:
    """Fine-tune LoRA on the training split; log curves; save and log the adapter."""
    connect(config.tracking)
    with stage_timer(run_id, "train_lora"):
        set_seed(config.train.seed)
        dataset = load_from_disk(str(data.dataset.fetch() / "tokenized"))
        for name, split in dataset.items():  # model inputs only (a packed train split differs)
            inputs = [c for c in split.column_names if c in MODEL_INPUTS]
            dataset[name] = split.select_columns(inputs)
        model, report, tokenizer, collator, compute_metrics, task_type = task_setup(config, data)
        device = pick_device(config.train)
        precision = pick_precision(config.train, device)
        adapter_dir = stage_dir(config, run_id, "adapter")
        checkpoints = checkpoint_dir(config, run_id)
        trainer = GuardedTrainer(
            model=model,
            args=training_arguments(config, checkpoints, device, precision),
            train_dataset=dataset["train"],
            eval_dataset=dataset["validation"] if "validation" in dataset else None,
            data_collator=collator,
            compute_metrics=compute_metrics,
            callbacks=[MlflowStepLogger(run_id)],
        )
        resume = last_complete_checkpoint(checkpoints)
        if resume:
            set_tags(run_id, {"train.resumed_from": Path(resume).name})
        result = trainer.train(resume_from_checkpoint=resume)
        n_tokens = int(sum(len(ids) for ids in dataset["train"]["input_ids"]))
        epochs_done = result.metrics.get("epoch", config.train.epochs)
        log_metrics(
            run_id,
            {
                "train.trainable_params": report.trainable_params,
                "train.total_params": report.total_params,
                "train.trainable_fraction": report.trainable_params / report.total_params,
                "train.runtime_seconds": result.metrics["train_runtime"],
                "train.samples_per_second": result.metrics["train_samples_per_second"],
                "train.tokens_per_second": n_tokens * epochs_done / result.metrics["train_runtime"],
                "train.final_loss": result.training_loss,
            },
            step=result.global_step,
        )
        set_tags(
            run_id,
            {
                "train.device": device,
                "train.precision": precision,
                "lora.target_names": ",".join(report.target_names)[:5000],
            },
        )
        model.cpu()
        save_adapter(
            model,
            adapter_dir,
            base_model_name_or_path=resolve_model_path(config.model.name_or_path),
            task_type=task_type,
        )
        tokenizer.save_pretrained(str(adapter_dir))
        if data.label_names:
            (adapter_dir / "label_names.json").write_text(json.dumps(data.label_names))
        ref = log_folder(run_id, adapter_dir, "adapter")
    return TrainedAdapter(
        adapter=ref,
        device=device,
        precision=precision,
        trainable_params=report.trainable_params,
        total_params=report.total_params,
        global_steps=result.global_step,
    )


train_lora_task = stage_task(train_lora, name="train-lora", retries=1, tags=("gpu",))
