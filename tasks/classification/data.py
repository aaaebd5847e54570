"""prepare_data for classification: labelled texts -> cleaned, stratified, tokenized splits.

Saved under <data>: `tokenized` (a DatasetDict: text, label, labels and the tokenizer's
inputs, unpadded; the collator pads per batch), `tokenizer` and `label_names.json`.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pandas as pd
from datasets import Dataset, DatasetDict, Value, load_from_disk
from sklearn.model_selection import train_test_split

from tasks.classification.modeling import check_base_model
from tasks.common.config import DataConfig, PipelineConfig
from tasks.common.credentials import redact
from tasks.common.datasets import (
    DATA_PROFILE_FILE,
    SPLITS,
    columns_found,
    content_sha256,
    find_split_files,
    finish_splits,
    load_rows,
    log_dataset_inputs,
    require_text,
)
from tasks.common.errors import DataError
from tasks.common.models import load_tokenizer
from tasks.common.stage import StageContext
from tasks.records import PreparedData

LABELS_FILE = "label_names.json"
CLASS_COUNTS_FILE = "data/class_counts.json"  # a table artifact: split, label, rows


def read_table(path: Path, data: DataConfig) -> pd.DataFrame:
    """One file of labelled texts as (text, label) strings; checks the columns and their types."""
    rows = load_rows(path, data)
    wanted = (data.text_column, data.label_column)
    missing = [c for c in wanted if c not in rows.column_names]
    if missing:
        raise DataError(
            f"data file {path} has no column {', '.join(map(repr, missing))}; "
            f"{columns_found(rows.column_names)}; set data.text_column / data.label_column"
        )
    require_text(
        rows,
        data.text_column,
        path,
        "convert the texts to strings, or set data.text_column to the column that holds them",
    )
    label = rows.features[data.label_column]
    if not isinstance(label, Value):
        raise DataError(
            f"data file {path}: column {data.label_column!r} holds "
            f"{type(label).__name__.lower()} values; a label is one name or number per row"
        )
    if label.dtype not in ("string", "large_string"):
        rows = rows.cast_column(data.label_column, Value("string"))  # 1 -> "1", as written
    frame = rows.select_columns(list(wanted)).to_pandas()
    return frame.rename(columns={data.text_column: "text", data.label_column: "label"})


def clean(frame: pd.DataFrame, where: str) -> tuple[pd.DataFrame, dict[str, int], Counter]:
    """Strip texts and labels, drop empty texts, missing labels and exact duplicates; returns
    the rows, the drop counts and how often each label was written (before stripping)."""
    text = frame["text"].astype("string").str.strip()
    label = frame["label"].astype("string")
    empty = text.isna() | (text == "")
    no_label = label.isna() | (label.str.strip() == "")
    spellings = Counter(label[~empty & ~no_label])
    out = pd.DataFrame({"text": text, "label": label.str.strip()})[~empty & ~no_label]
    out = out.astype(str)
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
    return out.reset_index(drop=True), counts, spellings


def check_spellings(spellings: Counter, where: str) -> None:
    """Labels that differ only in letter case or spacing are an error, never merged or split."""
    groups: dict[str, list[str]] = {}
    for written in spellings:
        groups.setdefault("".join(written.casefold().split()), []).append(written)
    clashes = [sorted(names) for names in groups.values() if len(names) > 1]
    if clashes:
        listing = "; ".join(
            " and ".join(f"{n!r} ({spellings[n]} rows)" for n in names) for names in clashes[:3]
        )
        raise DataError(
            f"data: labels {listing} differ only in letter case or spacing ({where}); they would "
            f"become separate classes: write each class the same way in every row"
        )


def carve(frame: pd.DataFrame, share: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Seeded stratified cut of `share` of the rows; returns (rest, part)."""
    counts = frame["label"].value_counts()
    rare = counts[counts < 2]
    if not rare.empty:
        raise DataError(
            f"data: classes {', '.join(map(repr, rare.index))} have fewer than 2 rows; "
            f"a stratified split needs at least 2 rows per class (add rows)"
        )
    cut_rows = math.ceil(share * len(frame))  # as train_test_split counts them
    smaller = min(cut_rows, len(frame) - cut_rows)
    if smaller < len(counts):
        raise DataError(
            f"data: cutting {share:.0%} of {len(frame)} rows leaves {smaller} rows on one side "
            f"for {len(counts)} classes; a stratified split needs at least one row per class on "
            f"each side: add rows, or set data.split.test / data.split.validation so that "
            f"each share holds at least {len(counts)} rows"
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
    spellings: Counter = Counter()
    for name, path in files.items():
        splits[name], counts, written = clean(read_table(path, data), where=str(path))
        spellings += written
        for key, value in counts.items():
            dropped[key] += value
    check_spellings(spellings, ", ".join(str(p) for p in files.values()))
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


def class_counts(splits: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Rows per label in each split, one row per (split, label)."""
    rows = [
        {"split": name, "label": str(label), "rows": int(count)}
        for name, frame in splits.items()
        for label, count in frame["label"].value_counts().sort_index().items()
    ]
    return pd.DataFrame(rows, columns=["split", "label", "rows"])


def prepare_data(stage: StageContext) -> PreparedData:
    """Read the configured data, clean and split it, tokenize, save and log it."""
    config, run = stage.config, stage.run
    check_base_model(config.model, config.data.max_length)
    splits, dropped, content_sha = build_splits(config.data)
    names = check_labels(splits)
    dataset, tokenizer, truncated = tokenize(splits, names, config)
    out_dir = stage.stage_dir("data")
    dataset.save_to_disk(str(out_dir / "tokenized"))
    tokenizer.save_pretrained(str(out_dir / "tokenizer"))
    (out_dir / LABELS_FILE).write_text(json.dumps(names))
    rows = {name: len(frame) for name, frame in splits.items()}
    metrics = {f"rows.{k}": v for k, v in rows.items()}
    metrics |= {f"dropped.{k}": v for k, v in dropped.items()}
    metrics |= {f"truncated.{k}": v for k, v in truncated.items()}
    run.log_figures(metrics, DATA_PROFILE_FILE)
    run.log_table(class_counts(splits), CLASS_COUNTS_FILE)
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
