"""prepare_data for classification: labelled texts -> cleaned, stratified, tokenized splits.

Saved under <data>: `tokenized` (a DatasetDict: text, label, labels and the tokenizer's
inputs, unpadded; the collator pads per batch), `tokenizer` and `label_names.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from datasets import Dataset, DatasetDict, load_from_disk
from sklearn.model_selection import train_test_split

from tasks.common.config import DataConfig, PipelineConfig
from tasks.common.datasets import (
    SPLITS,
    content_sha256,
    find_split_files,
    finish_splits,
    load_frame,
    log_dataset_inputs,
)
from tasks.common.errors import DataError
from tasks.common.models import load_tokenizer
from tasks.common.stage import StageContext
from tasks.common.tracking import redact
from tasks.records import PreparedData

LABELS_FILE = "label_names.json"


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


def prepare_data(stage: StageContext) -> PreparedData:
    """Read the configured data, clean and split it, tokenize, save and log it."""
    config, run = stage.config, stage.run
    splits, dropped, content_sha = build_splits(config.data)
    names = check_labels(splits)
    dataset, tokenizer, truncated = tokenize(splits, names, config)
    out_dir = stage.stage_dir("data")
    dataset.save_to_disk(str(out_dir / "tokenized"))
    tokenizer.save_pretrained(str(out_dir / "tokenizer"))
    (out_dir / LABELS_FILE).write_text(json.dumps(names))
    rows = {name: len(frame) for name, frame in splits.items()}
    metrics = {f"data.rows.{k}": v for k, v in rows.items()}
    metrics |= {f"data.dropped.{k}": v for k, v in dropped.items()}
    metrics |= {f"data.truncated.{k}": v for k, v in truncated.items()}
    for name, frame in splits.items():
        for label, count in frame["label"].value_counts().items():
            metrics[f"data.class_count.{name}.{label}"] = int(count)
    run.log_metrics(metrics)
    run.set_tags(
        {
            "task": config.task,
            "data.content_sha256": content_sha,
            "data.path": redact(config.data.path),
        }
    )
    log_dataset_inputs(run, config.data, splits, targets="label")
    ref = run.log_folder(out_dir, "data")
    return PreparedData(dataset=ref, rows=rows, content_sha256=content_sha, dropped=dropped)


def label_names(stage: StageContext, data: PreparedData) -> list[str]:
    """The class names, in label-id order, that prepare_data saved."""
    return json.loads((stage.fetch(data.dataset) / LABELS_FILE).read_text())


def load_split(stage: StageContext, data: PreparedData, name: str):
    """One tokenized split (text, label name, label id and the tokenizer's inputs)."""
    return load_from_disk(str(stage.fetch(data.dataset) / "tokenized"))[name]
