"""Stage 1: read, validate, clean, split and tokenize the labelled texts."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import pandas as pd
from datasets import Dataset, DatasetDict, load_dataset
from mlflow.entities import DatasetInput, InputTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
from sklearn.model_selection import train_test_split

from tasks.config import DataConfig, PipelineConfig
from tasks.errors import DataError
from tasks.modeling import load_tokenizer
from tasks.stage import stage_task
from tasks.storage import stage_dir
from tasks.tracking import (
    ArtifactRef,
    connect,
    log_folder,
    log_metrics,
    redact,
    set_tags,
    stage_timer,
)

SPLITS = ("train", "validation", "test")
SPLIT_FILE_STEMS = {
    "train": ("train",),
    "validation": ("validation", "valid", "val", "dev"),
    "test": ("test",),
}
FORMATS = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class PreparedData:
    """What training and evaluation need: the tokenized splits and the label map."""

    dataset: ArtifactRef
    label_names: list[str]
    rows: dict[str, int]
    content_sha256: str
    dropped: dict[str, int] = field(default_factory=dict)


def _format_of(path: Path, data: DataConfig) -> str:
    if data.format != "auto":
        return data.format
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"data file {path}: unknown format {path.suffix or '(no extension)'!r}; use .csv, "
            f".jsonl or .parquet, or set data.format to csv, json or parquet"
        )
    return fmt


def find_split_files(data: DataConfig) -> dict[str, Path]:
    """One file ({'all': path}) or a folder's train/validation/test files."""
    path = Path(data.path)
    if path.is_file():
        return {"all": path}
    if not path.is_dir():
        raise DataError(
            f"data.path {data.path!r} does not exist: point it at a CSV/JSONL/Parquet "
            f"file or a folder with train/validation/test files"
        )
    found: dict[str, Path] = {}
    for split, stems in SPLIT_FILE_STEMS.items():
        for candidate in sorted(path.iterdir()):
            if (
                candidate.is_file()
                and candidate.stem.lower() in stems
                and (candidate.suffix.lower() in FORMATS or data.format != "auto")
            ):
                found[split] = candidate
                break
    if "train" not in found:
        names = ", ".join(sorted(p.name for p in path.iterdir())) or "(empty)"
        raise DataError(
            f"data folder {path} has no train file (train.csv, train.jsonl or "
            f"train.parquet); it holds: {names}"
        )
    return found


def load_frame(path: Path, data: DataConfig) -> pd.DataFrame:
    """Read one CSV/JSONL/Parquet file with `datasets`; errors name the file and the fix."""
    fmt = _format_of(path, data)
    if path.stat().st_size == 0:
        raise DataError(f"data file {path} is empty: it needs a header and at least one row")
    try:
        frame = load_dataset(fmt, data_files=str(path), split="train").to_pandas()
    except UnicodeDecodeError as exc:
        raise DataError(
            f"data file {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
            f"re-save it as UTF-8"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - the readers raise many types; the file is the cause
        raise DataError(f"data file {path} could not be read as {fmt}: {exc}") from exc
    if frame.empty:
        raise DataError(f"data file {path} has a header but no rows")
    return frame


def read_table(path: Path, data: DataConfig) -> pd.DataFrame:
    """Read one file of labelled texts; checks the configured text and label columns."""
    frame = load_frame(path, data)
    missing = [c for c in (data.text_column, data.label_column) if c not in frame.columns]
    if missing:
        raise DataError(
            f"data file {path} has no column {', '.join(map(repr, missing))}; columns found: "
            f"{', '.join(map(repr, frame.columns))}; set data.text_column / data.label_column"
        )
    return frame


def clean(frame: pd.DataFrame, data: DataConfig, where: str) -> tuple[pd.DataFrame, dict[str, int]]:
    """Keep text/label, strip texts, drop empty texts, missing labels and exact duplicates."""
    out = pd.DataFrame(
        {
            "text": frame[data.text_column].astype("string").str.strip(),
            "label": frame[data.label_column],
        }
    )
    empty = out["text"].isna() | (out["text"] == "")
    no_label = out["label"].isna()
    out = out[~empty & ~no_label].copy()
    out["label"] = out["label"].astype(str).str.strip()
    before = len(out)
    out = out.drop_duplicates(subset="text", keep="first")
    counts = {
        "empty_text": int(empty.sum()),
        "missing_label": int((no_label & ~empty).sum()),
        "duplicates": before - len(out),
    }
    if out.empty:
        raise DataError(
            f"data {where}: no rows left after dropping empty texts and missing labels "
            f"({counts['empty_text']} empty texts, {counts['missing_label']} missing labels)"
        )
    return out.reset_index(drop=True), counts


def carve(frame: pd.DataFrame, share: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Seeded stratified cut of `share` of the rows; returns (rest, part)."""
    counts = frame["label"].value_counts()
    rare = counts[counts < 2]
    if not rare.empty:
        raise DataError(
            f"data: classes {', '.join(map(repr, rare.index))} have fewer than 2 rows; "
            f"a stratified split needs at least 2 rows per class (add rows)"
        )
    rest, part = train_test_split(
        frame, test_size=share, random_state=seed, stratify=frame["label"]
    )
    return rest.reset_index(drop=True), part.reset_index(drop=True)


def finish_splits(splits: dict[str, pd.DataFrame], data: DataConfig, cut) -> int:
    """Split in place: one table ('all') into train/validation/test, or a folder's missing
    splits out of train, with cut(frame, share, seed) -> (rest, part) (stratified or random);
    then drop validation/test rows seen in train and refuse empty splits. Returns the leaked
    count."""
    if "all" in splits:
        rest, splits["test"] = cut(splits.pop("all"), data.split.test, data.seed)
        splits["train"] = rest
        if data.split.validation > 0:
            share = data.split.validation / (1.0 - data.split.test)
            splits["train"], splits["validation"] = cut(rest, share, data.seed)
    else:  # a folder: carve the splits it lacks out of train
        for name, share in (("test", data.split.test), ("validation", data.split.validation)):
            if name not in splits and share > 0:
                splits["train"], splits[name] = cut(splits["train"], share, data.seed)
    leaked = remove_leakage(splits)
    for name, frame in splits.items():
        if frame.empty:
            raise DataError(
                f"data: the {name} split is empty after cleaning; add rows or change data.split"
            )
    return leaked


def remove_leakage(splits: dict[str, pd.DataFrame]) -> int:
    """Drop validation/test texts seen in train (and test texts from validation). Returns count."""
    seen = set(splits["train"]["text"])
    dropped = 0
    for name in ("test", "validation"):
        if name not in splits:
            continue
        frame = splits[name]
        leaked = frame["text"].isin(seen)
        dropped += int(leaked.sum())
        splits[name] = frame[~leaked].reset_index(drop=True)
        seen |= set(splits[name]["text"])
    return dropped


def check_labels(splits: dict[str, pd.DataFrame]) -> list[str]:
    """The label names (sorted); errors for one class or classes unseen in train."""
    train_labels = set(splits["train"]["label"])
    if len(train_labels) < 2:
        raise DataError(
            f"data: the training split has only one class ({sorted(train_labels)[0]!r}); "
            f"classification needs at least two"
        )
    for name, frame in splits.items():
        unseen = set(frame["label"]) - train_labels
        if unseen:
            raise DataError(
                f"data: the {name} split has classes not in train: "
                f"{', '.join(map(repr, sorted(unseen)))}; add training rows for them"
            )
    return sorted(train_labels)


def content_sha256(paths: list[Path]) -> str:
    """sha256 over the data files' names and bytes (the data's identity)."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def build_splits(data: DataConfig) -> tuple[dict[str, pd.DataFrame], dict[str, int], str]:
    """Read, clean, split and de-leak; returns the splits, drop counts and content hash."""
    files = find_split_files(data)
    dropped = {"empty_text": 0, "missing_label": 0, "duplicates": 0}
    splits: dict[str, pd.DataFrame] = {}
    for name, path in files.items():
        splits[name], counts = clean(read_table(path, data), data, where=str(path))
        for key, value in counts.items():
            dropped[key] += value
    dropped["leaked"] = finish_splits(splits, data, carve)
    return splits, dropped, content_sha256(list(files.values()))


def tokenize(splits: dict[str, pd.DataFrame], label_names: list[str], config: PipelineConfig):
    """Tokenize without padding (the collator pads per batch); count truncated texts."""
    tokenizer = load_tokenizer(config.model)
    label_ids = {name: i for i, name in enumerate(label_names)}
    max_length = config.data.max_length
    truncated: dict[str, int] = {}
    parts = {}
    for name in SPLITS:
        if name not in splits:
            continue
        frame = splits[name]
        full = tokenizer(list(frame["text"]), truncation=False)["input_ids"]
        truncated[name] = sum(len(ids) > max_length for ids in full)
        encoded = tokenizer(list(frame["text"]), truncation=True, max_length=max_length)
        columns = {
            "text": list(frame["text"]),
            "label": list(frame["label"]),
            "labels": [label_ids[x] for x in frame["label"]],
            **encoded,
        }
        parts[name] = Dataset.from_dict(columns)
    return DatasetDict(parts), tokenizer, truncated


def prepare_data(config: PipelineConfig, run_id: str) -> PreparedData:
    """Read the configured data, clean and split it, tokenize, save and log it."""
    if config.task == "causal_lm":
        from tasks.causal.data import prepare_causal_data  # imported here: it imports this module

        return prepare_causal_data(config, run_id)
    connect(config.tracking)
    with stage_timer(run_id, "prepare_data"):
        splits, dropped, content_sha = build_splits(config.data)
        label_names = check_labels(splits)
        dataset, tokenizer, truncated = tokenize(splits, label_names, config)
        out_dir = stage_dir(config, run_id, "data")
        dataset.save_to_disk(str(out_dir / "tokenized"))
        tokenizer.save_pretrained(str(out_dir / "tokenizer"))
        (out_dir / "label_names.json").write_text(json.dumps(label_names))
        rows = {name: len(frame) for name, frame in splits.items()}
        _log(run_id, config, splits, rows, dropped, truncated, content_sha)
        ref = log_folder(run_id, out_dir, "data")
    return PreparedData(
        dataset=ref, label_names=label_names, rows=rows, content_sha256=content_sha, dropped=dropped
    )


def _log(run_id, config, splits, rows, dropped, truncated, content_sha) -> None:
    metrics = {f"data.rows.{k}": v for k, v in rows.items()}
    metrics |= {f"data.dropped.{k}": v for k, v in dropped.items()}
    metrics |= {f"data.truncated.{k}": v for k, v in truncated.items()}
    for name, frame in splits.items():
        for label, count in frame["label"].value_counts().items():
            metrics[f"data.class_count.{name}.{label}"] = int(count)
    log_metrics(run_id, metrics)
    set_tags(run_id, {"data.content_sha256": content_sha, "data.path": redact(config.data.path)})
    source = redact(Path(config.data.path).resolve())
    inputs = []
    for name, frame in splits.items():
        ds = mlflow.data.from_pandas(
            frame, source=source, targets="label", name=f"{Path(config.data.path).stem}-{name}"
        )
        inputs.append(
            DatasetInput(ds._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, name)])
        )
    MlflowClient().log_inputs(run_id, datasets=inputs)


prepare_data_task = stage_task(prepare_data, name="prepare-data", retries=2)
