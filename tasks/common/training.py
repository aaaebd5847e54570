"""LoRA training with transformers' Trainer, the same for every task kind and world size.

The kind builds the model (with LoRA injected), the tokenizer, the collator and its metrics;
this module picks device and precision, runs the Trainer with resumable checkpoints, logs the
curves to the pipeline's MLflow run and saves the adapter in PEFT format.

Under torchrun (tasks/common/distributed.py) every rank runs `fit`; the Trainer (through
accelerate) wraps the model in DDP or FSDP and gives each rank its share of every global
batch, in the order one process would see it. Rank 0 alone gets a run to log to and writes
the adapter; every rank's speed and peak memory are gathered to it.
"""

from __future__ import annotations

import math
import os
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch
from datasets import DatasetDict
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback
from transformers.trainer_pt_utils import LengthGroupedSampler

from lora_core import InjectionReport, adapter_tensors, save_adapter
from tasks.common.config import PipelineConfig, TrainConfig, check_global_batch
from tasks.common.console import TrainingProgress, expected_warning
from tasks.common.errors import TrainingError
from tasks.common.faults import kill_point
from tasks.common.hardware import bf16_kernels
from tasks.common.models import resolve_model_path
from tasks.common.preflight import training_device_available
from tasks.common.storage import ensure_room
from tasks.common.tracking import TrackedRun

RUN_ID_ENV = "LORA_RUN_ID"  # the MLflow run, for the ranks that do not talk to MLflow
FSDP_NEEDS_CUDA = (
    "train.distributed.strategy fsdp needs CUDA GPUs (accelerate's FSDP does not run on CPU): "
    "use strategy ddp here, or train on the gpu pool (train.deployment)"
)
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "labels")


@dataclass
class TrainingSetup:
    """What a task kind trains: the LoRA model and how batches and metrics are made."""

    model: torch.nn.Module
    report: InjectionReport
    tokenizer: Any
    collator: Callable
    compute_metrics: Callable | None
    task_type: str  # PEFT's task type: SEQ_CLS (head saved with the adapter) or CAUSAL_LM
    files: dict[str, str] = field(default_factory=dict)  # written beside the adapter


@dataclass(frozen=True)
class TrainingResult:
    """How the adapter was trained."""

    device: str
    precision: str
    trainable_params: int
    total_params: int
    global_steps: int


def pick_device(train: TrainConfig) -> str:
    """cuda, then mps, then cpu (or what the config asks for)."""
    if train.device != "auto":
        return train.device
    return next(d for d in ("cuda", "mps", "cpu") if training_device_available(d))


def pick_precision(train: TrainConfig, device: str, flags: set[str] | None = None) -> str:
    """bf16 where the GPU supports it, else fp16 on GPU; on CPU bf16 autocast where the CPU has
    bf16 matrix kernels (AMX-BF16, AVX512-BF16), else fp32. Master weights stay fp32 either way,
    so the adapter, the merge and the export do not change."""
    if train.precision != "auto":
        return train.precision
    if device == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device == "cpu" and bf16_kernels(flags):
        return "bf16"
    return "fp32"


# Half-precision training pads each batch to a multiple of 8 tokens. On a CPU, oneDNN builds a
# kernel for every new matrix shape it sees in bf16 (some 25 shapes a step, a millisecond or two
# each), and dynamic padding brings a new length with most batches (a MiniLM step at a length
# not seen before: 200 ms, at a seen one 149): on the demo with AMX the stage ran 12% faster
# padded to 8 (10.2% -> 20.2% padding). GPU tensor cores want multiples of 8 as well. fp32 on
# CPU (MKL, no per-shape kernels) only pays for the padding, so it pads to the longest text.
HALF_PAD_MULTIPLE = 8


def pad_multiple(precision: str) -> int | None:
    """The multiple a training batch's length is padded to (None: its longest text)."""
    return HALF_PAD_MULTIPLE if precision in ("bf16", "fp16") else None


# The Trainer's closing summary and per-evaluation timings repeat what _log_training records
# once (train/final_loss, train/runtime_seconds, ...): not logged as curves.
SUMMARY_LOGS = ("epoch", "train_loss", "train_runtime", "total_flos", "eval_runtime")
_SPEEDS = ("_samples_per_second", "_steps_per_second")


class MlflowStepLogger(TrainerCallback):
    """Sends the Trainer's logs (loss, lr, grad norm, eval metrics) to the pipeline run as
    train/<name> and eval/<name> curves."""

    def __init__(self, run: TrackedRun):
        self.run = run

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or not state.is_world_process_zero:
            return
        metrics = {}
        for key, value in logs.items():
            if not isinstance(value, int | float) or key in SUMMARY_LOGS or key.endswith(_SPEEDS):
                continue
            name = key[len("eval_") :] if key.startswith("eval_") else key
            prefix = "eval" if key.startswith("eval_") else "train"
            metrics[f"{prefix}/{name}"] = value
        if metrics:
            metrics["train/epoch"] = logs.get("epoch", state.epoch or 0.0)
            self.run.log_metrics(metrics, step=state.global_step)


def token_lengths(dataset, batch_size: int = 65_536) -> np.ndarray:
    """Each row's number of input_ids, read from Arrow's list offsets a batch at a time (the
    column is never turned into Python lists: 1M rows of token ids would take gigabytes)."""
    batches = dataset.select_columns(["input_ids"]).with_format("arrow").iter(batch_size)
    parts = [pc.list_value_length(batch["input_ids"]).to_numpy() for batch in batches]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


class GuardedTrainer(Trainer):
    """Trainer that stops at the first NaN/inf loss instead of training on garbage, counts
    the tokens this process trained on, and groups by length over the *global* batch (the
    Trainer's own sampler groups per process: another data order for another world size)."""

    tokens_seen = 0
    first_step_at: float | None = None  # time.time() when this process began its first step

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not self.args.group_by_length:
            return super()._get_train_sampler(dataset)
        args = self.args
        lengths = token_lengths(dataset).tolist()
        size = args.train_batch_size * args.world_size * args.gradient_accumulation_steps
        return LengthGroupedSampler(size, lengths=lengths)

    def _load_optimizer_and_scheduler(self, checkpoint):
        """As the Trainer does, but CPU ranks load to "cpu": the Trainer maps to args.device
        when world_size > 1, which on CPU is "cpu:0", a location torch.load cannot restore."""
        if checkpoint is None or self.args.world_size == 1 or self.args.device.type != "cpu":
            return super()._load_optimizer_and_scheduler(checkpoint)
        folder = Path(checkpoint)
        self.optimizer.load_state_dict(
            torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
        )
        self.lr_scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))

    def training_step(self, model, inputs, num_items_in_batch=None):
        if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":  # first attempt only
            kill_point(f"rank{os.environ.get('RANK', 0)}:step{self.state.global_step + 1}")
        if self.first_step_at is None:
            self.first_step_at = time.time()
        mask = inputs.get("attention_mask")
        self.tokens_seen += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
        loss = super().training_step(model, inputs, num_items_in_batch)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TrainingError(
                f"training loss became {value} at step {self.state.global_step + 1}: lower "
                f"train.learning_rate, or use precision fp32 / bf16 instead of fp16"
            )
        return loss


def checkpoint_dir(config: PipelineConfig, run_id: str) -> Path:
    """Where this MLflow run's Trainer checkpoints live (durable, shared with GPU workers)."""
    root = config.train.checkpoint_dir or str(Path(config.output_dir) / "checkpoints")
    return Path(root) / run_id


def checkpoint_room(config: PipelineConfig, run_id: str, report: InjectionReport) -> Path:
    """The run's checkpoint folder, checked for access and room before the first step: two
    checkpoints of the trainable weights with their AdamW moments (fp32), plus 50 MB."""
    folder = checkpoint_dir(config, run_id)
    if not config.train.checkpoint_steps:
        return folder
    need = 50 + 2 * 3 * 4 * report.trainable_params / 2**20
    return ensure_room(folder, need, "train", setting="train.checkpoint_dir")


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


def world_size() -> int:
    """Processes training together (torchrun's WORLD_SIZE; 1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def sharding(config: PipelineConfig, device: str) -> dict[str, Any]:
    """The Trainer's FSDP arguments for strategy fsdp (FSDP2: the frozen base and the LoRA
    weights sharded per transformer block, each parameter keeping its requires_grad)."""
    if config.train.distributed.strategy != "fsdp" or world_size() == 1:
        return {}
    if device != "cuda":
        raise TrainingError(FSDP_NEEDS_CUDA)
    return {
        "fsdp": "full_shard auto_wrap",
        "fsdp_config": {"version": 2, "reshard_after_forward": True},
    }


MIXED_PRECISION = {"bf16": "bf16", "fp16": "fp16"}  # precision -> accelerate's name ("no")


def training_arguments(
    config: PipelineConfig, out_dir: Path, device: str, precision: str, evaluate: bool = True
):
    """The Trainer's arguments; evaluate=False (no validation split): no per-epoch evaluation.
    train.batch_size is the global batch: each process takes batch / (world x accumulation)."""
    train = config.train
    every = train.checkpoint_steps
    # TrainingArguments reads ACCELERATE_MIXED_PRECISION and writes it only for bf16/fp16: a
    # bf16 training earlier in this process (or in the parent of a rank) would leave an fp32
    # one running under bf16 autocast. Say what this one wants.
    os.environ["ACCELERATE_MIXED_PRECISION"] = MIXED_PRECISION.get(precision, "no")
    return TrainingArguments(
        output_dir=str(out_dir),
        num_train_epochs=train.epochs,
        max_steps=train.max_steps,
        per_device_train_batch_size=check_global_batch(train, world_size()),
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        per_device_eval_batch_size=config.eval.batch_size,
        learning_rate=train.learning_rate,
        weight_decay=train.weight_decay,
        warmup_ratio=train.warmup_ratio,
        logging_steps=train.logging_steps,
        eval_strategy="epoch" if evaluate else "no",
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
        average_tokens_across_devices=True,  # causal_lm: loss over the global batch's tokens
        ddp_find_unused_parameters=False,  # LoRA: every trainable weight is used each step
        ddp_backend=("nccl" if device == "cuda" else "gloo") if world_size() > 1 else None,
        # a rank waits this long for the others (to join the process group, in a collective),
        # then fails: a node that died while the group started does not hold it for 30 min
        ddp_timeout=train.distributed.join_timeout_s,
        **sharding(config, device),
    )


def model_inputs(dataset: DatasetDict) -> DatasetDict:
    """Each split's model input columns only (a packed train split has other columns)."""
    for name, split in dataset.items():
        dataset[name] = split.select_columns([c for c in split.column_names if c in MODEL_INPUTS])
    return dataset


def fit(
    config: PipelineConfig,
    run: TrackedRun | None,
    setup: TrainingSetup,
    dataset: DatasetDict,
    adapter_dir: Path,
    stage_started: float,
    callbacks: Sequence[TrainerCallback] = (),
) -> TrainingResult:
    """Train setup.model on dataset['train'] (resuming from the run's last complete checkpoint),
    log curves and figures to `run`, save the adapter (and tokenizer and setup.files).

    Call set_seed(config.train.seed) before building `setup` (LoRA and head init draw from
    it). `run` is None on the ranks other than 0: they train, and neither log nor write.
    `stage_started` (time.time() when the stage began) dates train/time_to_first_step_s: the
    set-up, and for several ranks their launch.
    """
    dataset = model_inputs(dataset)
    device = pick_device(config.train)
    precision = pick_precision(config.train, device)
    run_id = run.run_id if run is not None else os.environ[RUN_ID_ENV]
    checkpoints = checkpoint_room(config, run_id, setup.report)
    evaluate = "validation" in dataset
    trainer = GuardedTrainer(
        model=setup.model,
        args=training_arguments(config, checkpoints, device, precision, evaluate),
        train_dataset=dataset["train"],
        eval_dataset=dataset["validation"] if "validation" in dataset else None,
        data_collator=setup.collator,
        compute_metrics=setup.compute_metrics,
        callbacks=[TrainingProgress(), *([MlflowStepLogger(run)] if run is not None else [])]
        + list(callbacks),
    )
    trainer.remove_callback(PrinterCallback)  # its raw dicts: TrainingProgress's lines instead
    resume = last_complete_checkpoint(checkpoints)
    if resume and run is not None:
        run.set_tags({"train.resumed_from": Path(resume).name})
    with expected_warning(UserWarning, "transformers.trainer", "mtime may not be reliable"):
        result = trainer.train(resume_from_checkpoint=resume)  # (checkpoint rotation's note)
    ranks = rank_figures(trainer, result.metrics["train_runtime"], device)
    sharded = any(hasattr(p, "full_tensor") for p in setup.model.parameters())
    tensors = adapter_tensors(setup.model, setup.task_type) if sharded else None  # collective
    if run is not None:
        _log_training(run, config, setup.report, result, dataset["train"], device, precision)
        if trainer.first_step_at is not None:
            ranks["train/time_to_first_step_s"] = trainer.first_step_at - stage_started
        run.log_metrics(ranks, step=result.global_step)
        _save(config, setup, adapter_dir, tensors)
    return TrainingResult(
        device=device,
        precision=precision,
        trainable_params=setup.report.trainable_params,
        total_params=setup.report.total_params,
        global_steps=result.global_step,
    )


def _save(config: PipelineConfig, setup: TrainingSetup, adapter_dir: Path, tensors) -> None:
    """The adapter in PEFT format (`tensors`: gathered from FSDP's shards, else None), the
    tokenizer and the kind's files."""
    if tensors is None:
        setup.model.cpu()
    save_adapter(
        setup.model,
        adapter_dir,
        base_model_name_or_path=resolve_model_path(config.model.name_or_path),
        task_type=setup.task_type,
        tensors=tensors,
    )
    setup.tokenizer.save_pretrained(str(adapter_dir))
    for name, text in setup.files.items():
        (adapter_dir / name).write_text(text)


def peak_memory_mb(device: str) -> float:
    """This process's peak memory: CUDA allocations on a GPU, else its peak resident set."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def weights_checksum(model: torch.nn.Module) -> float:
    """Sum of this replica's trainable weights (float64): replicas in step have equal sums."""
    params = [p for p in model.parameters() if p.requires_grad and not hasattr(p, "full_tensor")]
    return float(sum(p.detach().double().sum() for p in params)) if params else 0.0


def rank_figures(trainer: GuardedTrainer, runtime_s: float, device: str) -> dict[str, float]:
    """train/world_size, each rank's tokens/s and peak memory, and how far the replicas'
    weights drifted apart (0 when every DDP replica holds the same weights); a collective."""
    mine = (trainer.tokens_seen / max(runtime_s, 1e-9), peak_memory_mb(device))
    mine += (weights_checksum(trainer.model),)
    world = world_size()
    figures = [mine]
    if world > 1:
        figures = [None] * world
        torch.distributed.all_gather_object(figures, mine)
    sums = [checksum for _, _, checksum in figures]
    metrics = {"train/world_size": world, "train/replica_divergence": max(sums) - min(sums)}
    for rank, (speed, memory, _) in enumerate(figures):
        metrics[f"train/rank{rank}/tokens_per_second"] = speed
        metrics[f"train/rank{rank}/peak_memory_mb"] = memory
    return metrics


def _log_training(run, config, report, result, train_split, device, precision) -> None:
    n_tokens = int(token_lengths(train_split).sum())
    epochs_done = result.metrics.get("epoch", config.train.epochs)
    run.log_metrics(
        {
            "train/trainable_params": report.trainable_params,
            "train/total_params": report.total_params,
            "train/trainable_fraction": report.trainable_params / report.total_params,
            "train/runtime_seconds": result.metrics["train_runtime"],
            "train/samples_per_second": result.metrics["train_samples_per_second"],
            "train/tokens_per_second": n_tokens * epochs_done / result.metrics["train_runtime"],
            "train/final_loss": result.training_loss,
        },
        step=result.global_step,
    )
    run.set_tags(
        {
            "train.device": device,
            "train.precision": precision,
            "train.cpu_bf16_kernels": bf16_kernels() or "none",  # what precision auto saw
            "train.strategy": config.train.distributed.strategy,
            "lora.target_names": ",".join(report.target_names)[:5000],
        }
    )
