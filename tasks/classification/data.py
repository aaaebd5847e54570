"""prepare_data for classification: labelled texts -> cleaned, stratified, tokenized splits.

Saved under <data>: `tokenized` (a DatasetDict: text, label, labels and the tokenizer's
inputs, unpadded; the collator pads per batch), `tokenizer` and `label_names.json`.

The rows stream: `datasets` reads each file into memory-mapped Arrow, a batched `map` strips
and digests them, the split works on row positions (sklearn's stratified cut, drawn the same
way without its Python lists), and one batched `map` tokenizes each split (truncation counted
from the tokenizer's overflow, so the texts are tokenized once; a fast tokenizer's ids go from
Rust into Arrow arrays without Python rows in between). Pages read from the mapped files are
given back as each step goes (mapped_pages).
"""

from __future__ import annotations

import copy
import itertools
import json
import math
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, DatasetDict, Value, load_from_disk
from sklearn.utils import check_random_state
from sklearn.utils.extmath import _approximate_mode

from tasks.classification.modeling import check_base_model
from tasks.common.config import DataConfig, PipelineConfig
from tasks.common.credentials import redact
from tasks.common.datasets import (
    DATA_PROFILE_FILE,
    KEY_SHA,
    ROW_SHA,
    SPLITS,
    Rows,
    columns_found,
    content_sha256,
    find_split_files,
    finish_splits,
    load_rows,
    log_dataset_inputs,
    map_rows,
    parallel_map,
    require_text,
    save_splits,
    sha16,
)
from tasks.common.errors import DataError
from tasks.common.mapped_pages import released
from tasks.common.models import load_tokenizer
from tasks.common.stage import StageContext
from tasks.records import PreparedData

LABELS_FILE = "label_names.json"
CLASS_COUNTS_FILE = "data/class_counts.json"  # a table artifact: split, label, rows
COLUMNS = ["text", "label"]


def read_table(path: Path, data: DataConfig) -> Dataset:
    """One file of labelled texts as (text, label) columns; checks the columns and their types."""
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
    rows = rows.select_columns(list(wanted))
    return rows.rename_columns({data.text_column: "text", data.label_column: "label"})


def clean_batch(batch: pa.Table) -> pa.Table:
    """Strip texts and labels (Arrow's Unicode whitespace), flag empty texts and missing labels,
    digest each text (the duplicate key) and each row; keep the label as written."""
    text = pc.utf8_trim_whitespace(pc.cast(batch["text"], pa.string()))
    written = pc.cast(batch["label"], pa.string())
    label = pc.utf8_trim_whitespace(written)
    texts, labels = text.to_pylist(), label.to_pylist()
    none = bytes(16)
    return pa.table(
        {
            "text": text,
            "label": label,
            "written": written,
            "empty": pc.fill_null(pc.equal(text, ""), True),
            "no_label": pc.fill_null(pc.equal(label, ""), True),
            KEY_SHA: [none if t is None else sha16(t) for t in texts],
            ROW_SHA: [
                none if t is None or x is None else sha16(f"{t}\0{x}")
                for t, x in zip(texts, labels, strict=True)
            ],
        }
    )


def clean(rows: Dataset, where: str) -> tuple[Rows, dict[str, int], Counter]:
    """Strip texts and labels, drop empty texts, missing labels and exact duplicates; returns
    the rows, the drop counts and how often each label was written (before stripping)."""
    arrow = rows.with_format("arrow")
    table = parallel_map(arrow, clean_batch, batched=True, desc="cleaning").with_format(None)
    with released(table):  # the columns read here: flags, labels, digests
        empty = table.data.column("empty").to_numpy()
        no_label = table.data.column("no_label").to_numpy()
        kept = ~empty & ~no_label
        written = pc.value_counts(pc.filter(table.data.column("written"), pa.array(kept)))
        spellings = Counter(dict(zip(*(written.field(i).to_pylist() for i in (0, 1)), strict=True)))
        counts = {
            "empty_text": int(empty.sum()),
            "missing_label": int((no_label & ~empty).sum()),
        }
        if not kept.any():
            raise DataError(
                f"data {where}: no rows left after dropping empty texts and missing labels "
                f"({counts['empty_text']} empty texts, {counts['missing_label']} missing labels)"
            )
        every = Rows.of(table, np.flatnonzero(kept))
        unique = every.first_of_each_key()
        counts["duplicates"] = len(every) - len(unique)
    return unique, counts, spellings


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


def with_classes(splits: dict[str, Rows]) -> None:
    """Give every split's rows their label codes (indices into the sorted label names)."""
    labels = {name: rows.table.data.column("label") for name, rows in splits.items()}
    with released(*(rows.table for rows in splits.values())):
        found = (pc.unique(c).drop_null().to_pylist() for c in labels.values())
        names = sorted(set().union(*found))
        value_set = pa.array(names, pa.string())
        for name, rows in splits.items():
            codes = pc.fill_null(pc.index_in(labels[name], value_set=value_set), -1).to_numpy()
            splits[name] = replace(rows, strata=codes[rows.positions], classes=tuple(names))


def carve(rows: Rows, share: float, seed: int) -> tuple[Rows, Rows]:
    """Seeded stratified cut of `share` of the rows (sklearn's, on the label codes, whose order
    is the names' order: the same cut as on the names); returns (rest, part)."""
    present, first, counts = np.unique(rows.strata, return_index=True, return_counts=True)
    rare = [rows.classes[present[i]] for i in np.argsort(first) if counts[i] < 2]  # as written
    if rare:
        raise DataError(
            f"data: classes {', '.join(map(repr, rare))} have fewer than 2 rows; "
            f"a stratified split needs at least 2 rows per class (add rows)"
        )
    cut_rows = math.ceil(share * len(rows))  # as train_test_split counts them
    smaller = min(cut_rows, len(rows) - cut_rows)
    if smaller < len(present):
        raise DataError(
            f"data: cutting {share:.0%} of {len(rows)} rows leaves {smaller} rows on one side "
            f"for {len(present)} classes; a stratified split needs at least one row per class on "
            f"each side: add rows, or set data.split.test / data.split.validation so that "
            f"each share holds at least {len(present)} rows"
        )
    rest, part = stratified_cut(rows.strata, cut_rows, seed)
    return rows.take(rest), rows.take(part)


def stratified_cut(strata: np.ndarray, part_rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """sklearn's `train_test_split(np.arange(n), test_size=part_rows / n, random_state=seed,
    stratify=strata)`: the same (rest, part) indices from the same random draws (its
    StratifiedShuffleSplit, step by step), without the Python lists of every index it builds
    on the way (about 40 bytes a row). strata: non-negative class codes, every class present
    at least twice and on both sides (carve checks that first)."""
    per_code = np.bincount(strata)
    present = np.flatnonzero(per_code)
    counts = per_code[present]  # rows per class, classes in sorted order (np.unique's)
    rank = np.zeros(len(per_code), dtype=strata.dtype)
    rank[present] = np.arange(len(present))
    members = np.split(np.argsort(rank[strata], kind="stable"), np.cumsum(counts)[:-1])
    rng = check_random_state(seed)
    rest_counts = _approximate_mode(counts, len(strata) - part_rows, rng)
    part_counts = _approximate_mode(counts - rest_counts, part_rows, rng)
    rest, part = [], []
    for i, indices in enumerate(members):
        shuffled = indices.take(rng.permutation(counts[i]), mode="clip")
        rest.append(shuffled[: rest_counts[i]])
        part.append(shuffled[rest_counts[i] : rest_counts[i] + part_counts[i]])
    return rng.permutation(np.concatenate(rest)), rng.permutation(np.concatenate(part))


def label_set(rows: Dataset) -> set[str]:
    """The distinct labels of a split (read from Arrow, not row by row)."""
    return set(pc.unique(rows.with_format("arrow")["label"]).to_pylist())


def check_labels(splits: dict[str, Dataset]) -> list[str]:
    """The label names (sorted); errors for one class or classes unseen in train."""
    train_labels = label_set(splits["train"])
    if len(train_labels) < 2:
        raise DataError(
            f"data: the training split has only one class ({sorted(train_labels)[0]!r}); "
            f"classification needs at least two"
        )
    for name, rows in splits.items():
        unseen = label_set(rows) - train_labels
        if unseen:
            raise DataError(
                f"data: the {name} split has classes not in train: "
                f"{', '.join(map(repr, sorted(unseen)))}; add training rows for them"
            )
    return sorted(train_labels)


def split_rows(data: DataConfig) -> tuple[dict[str, Rows], dict[str, int], str]:
    """Read, clean, split and de-leak; returns the splits' rows, drop counts and content hash."""
    files = find_split_files(data)
    dropped = {"empty_text": 0, "missing_label": 0, "duplicates": 0}
    splits: dict[str, Rows] = {}
    spellings: Counter = Counter()
    for name, path in files.items():
        splits[name], counts, written = clean(read_table(path, data), where=str(path))
        spellings += written
        for key, value in counts.items():
            dropped[key] += value
    check_spellings(spellings, ", ".join(str(p) for p in files.values()))
    with_classes(splits)
    dropped["leaked"] = finish_splits(splits, data, carve)
    return splits, dropped, content_sha256(list(files.values()))


def build_splits(data: DataConfig) -> tuple[dict[str, Dataset], dict[str, int], str]:
    """split_rows with each split as a Dataset of text and label (an indices mapping)."""
    splits, dropped, content_sha = split_rows(data)
    return {name: rows.dataset(COLUMNS) for name, rows in splits.items()}, dropped, content_sha


def truncating(tokenizer, max_length: int):
    """A copy of a fast tokenizer's Rust backend set up as `tokenizer(texts, truncation=True,
    max_length=max_length)` sets up its own (no padding), for encode_arrow."""
    backend = copy.deepcopy(tokenizer.backend_tokenizer)
    backend.no_padding()
    backend.enable_truncation(
        max_length, stride=0, strategy="longest_first", direction=tokenizer.truncation_side
    )
    return backend


def list_array(lists: list[list[int]], kind: pa.DataType) -> pa.ListArray:
    """Python lists of ints as one Arrow list array (flat values and offsets, no per-row
    Python objects in between)."""
    offsets = np.zeros(len(lists) + 1, dtype=np.int32)
    np.cumsum([len(x) for x in lists], out=offsets[1:])
    flat = np.fromiter(itertools.chain.from_iterable(lists), kind.to_pandas_dtype(), offsets[-1])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=kind))


def encode_arrow(
    batch: pa.Table, backend, input_names: list[str], label_ids: dict[str, int]
) -> pa.Table:
    """A fast tokenizer's pass over an Arrow batch with its `truncating` backend: the ids go
    straight from Rust to Arrow (the ids, type ids and masks of `tokenizer(texts,
    truncation=True, max_length=...)`, without BatchEncoding's Python lists); a text was
    truncated when it had tokens left over."""
    encoded = backend.encode_batch_fast(batch.column("text").to_pylist(), add_special_tokens=True)
    labels = [label_ids[x] for x in batch.column("label").to_pylist()]
    columns = {"labels": pa.array(labels, pa.int64())}
    columns["input_ids"] = list_array([e.ids for e in encoded], pa.int32())
    if "token_type_ids" in input_names:
        columns["token_type_ids"] = list_array([e.type_ids for e in encoded], pa.int8())
    if "attention_mask" in input_names:
        columns["attention_mask"] = list_array([e.attention_mask for e in encoded], pa.int8())
    columns["truncated"] = pa.array([bool(e.overflowing) for e in encoded])
    for name, column in columns.items():
        batch = batch.append_column(name, column)
    return batch


def encode_batch(batch: dict, tokenizer, label_ids: dict[str, int], max_length: int) -> dict:
    """A slow (Python) tokenizer's pass over a batch, truncated at max_length; a text was
    truncated when the tokenizer counted tokens left over."""
    encoded = tokenizer(
        batch["text"], truncation=True, max_length=max_length, return_overflowing_tokens=True
    )
    encoded.pop("overflowing_tokens")
    truncated = [n > 0 for n in encoded.pop("num_truncated_tokens")]
    labels = [label_ids[x] for x in batch["label"]]
    return {"labels": labels, **encoded, "truncated": truncated}


def encode_split(split: Dataset, tokenizer, label_ids: dict[str, int], max_length: int, name):
    """One split tokenized: a fast tokenizer in this process (its Rust threads use the CPUs),
    a slow one over several processes where the split is large."""
    if tokenizer.is_fast:
        options = {
            "backend": truncating(tokenizer, max_length),
            "input_names": list(tokenizer.model_input_names),
            "label_ids": label_ids,
        }
        arrow = split.with_format("arrow")
        done = map_rows(
            arrow, encode_arrow, batched=True, fn_kwargs=options, desc=f"tokenizing {name}"
        )
        return done.with_format(None)
    options = {"tokenizer": tokenizer, "label_ids": label_ids, "max_length": max_length}
    return parallel_map(
        split, encode_batch, batched=True, fn_kwargs=options, desc=f"tokenizing {name}"
    )


def tokenize(splits: dict[str, Dataset], label_names: list[str], config: PipelineConfig):
    """Tokenize without padding (the collator pads per batch); count truncated texts."""
    tokenizer = load_tokenizer(config.model)
    label_ids = {name: i for i, name in enumerate(label_names)}
    truncated: dict[str, int] = {}
    parts = {}
    for name in SPLITS:
        if name not in splits:
            continue
        encoded = encode_split(splits[name], tokenizer, label_ids, config.data.max_length, name)
        truncated[name] = int(pc.sum(encoded.data.column("truncated")).as_py() or 0)
        parts[name] = encoded.remove_columns("truncated")
    return DatasetDict(parts), tokenizer, truncated


def class_counts(splits: dict[str, Dataset]) -> pd.DataFrame:
    """Rows per label in each split, one row per (split, label)."""
    rows = []
    for name, split in splits.items():
        counts = pc.value_counts(split.with_format("arrow")["label"])
        pairs = zip(counts.field(0).to_pylist(), counts.field(1).to_pylist(), strict=True)
        rows += [{"split": name, "label": label, "rows": n} for label, n in sorted(pairs)]
    return pd.DataFrame(rows, columns=["split", "label", "rows"])


def prepare_data(stage: StageContext) -> PreparedData:
    """Read the configured data, clean and split it, tokenize, save and log it.

    Each table is let go once the next is made (the cleaned rows after the splits are gathered,
    the splits after tokenizing): a memory-mapped Arrow file counts in the process's resident
    memory for as long as it is open and its pages were read."""
    config, run = stage.config, stage.run
    check_base_model(config.model, config.data.max_length)
    splits, dropped, content_sha = split_rows(config.data)
    gathered = {name: rows.dataset_and_digest(COLUMNS) for name, rows in splits.items()}
    del splits
    tables = {name: table for name, (table, _) in gathered.items()}
    with released(*tables.values()):  # the label columns read to check and count
        names = check_labels(tables)
        counts = class_counts(tables)
    rows = {name: len(split) for name, split in tables.items()}
    metrics = {f"rows.{k}": v for k, v in rows.items()}
    metrics |= {f"dropped.{k}": v for k, v in dropped.items()}
    run.log_table(counts, CLASS_COUNTS_FILE)
    log_dataset_inputs(run, config.data, gathered, targets="label")
    del gathered
    dataset, tokenizer, truncated = tokenize(tables, names, config)
    del tables
    out_dir = stage.stage_dir("data")
    save_splits(dataset, out_dir / "tokenized")
    del dataset
    tokenizer.save_pretrained(str(out_dir / "tokenizer"))
    (out_dir / LABELS_FILE).write_text(json.dumps(names))
    metrics |= {f"truncated.{k}": v for k, v in truncated.items()}
    run.log_figures(metrics, DATA_PROFILE_FILE)
    run.set_tags(
        {
            "task": config.task,
            "data.content_sha256": content_sha,
            "data.path": redact(config.data.path),
        }
    )
    ref = run.log_folder(out_dir, "data")
    return PreparedData(dataset=ref, rows=rows, content_sha256=content_sha, dropped=dropped)


def label_names(stage: StageContext, data: PreparedData) -> list[str]:
    """The class names, in label-id order, that prepare_data saved."""
    return json.loads((stage.fetch(data.dataset) / LABELS_FILE).read_text())


def load_split(stage: StageContext, data: PreparedData, name: str):
    """One tokenized split (text, label name, label id and the tokenizer's inputs)."""
    return load_from_disk(str(stage.fetch(data.dataset) / "tokenized"))[name]
