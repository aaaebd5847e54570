"""Data files for every task kind: finding them, reading them, splitting and de-leaking them.

One file is split into train/validation/test (seeded); a folder gives its train, validation
and test files, and the splits it lacks are carved out of train. Texts of validation and test
that also occur in train are dropped (leakage). The content hash of the files is the data's
identity for re-run detection.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import mlflow
import pandas as pd
from datasets import Dataset, Features, Value, load_dataset
from mlflow.data.dataset_source_registry import get_dataset_source_from_json
from mlflow.entities import DatasetInput, InputTag
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from tasks.common.config import DataConfig
from tasks.common.credentials import redact
from tasks.common.errors import DataError
from tasks.common.tracking import TrackedRun

SPLITS = ("train", "validation", "test")
DATA_PROFILE_FILE = "data/profile.json"  # table: rows.<split>, dropped.<reason>, truncated.<split>
SPLIT_FILE_STEMS = {
    "train": ("train",),
    "validation": ("validation", "valid", "val", "dev"),
    "test": ("test",),
}
FORMATS = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# cut(frame, share, seed) -> (rest, part): a stratified or a random seeded cut
Cut = Callable[[pd.DataFrame, float, int], tuple[pd.DataFrame, pd.DataFrame]]


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


def _split_file(folder: Path, split: str, data: DataConfig) -> Path | None:
    """The one file of folder holding split (train.csv, valid.jsonl, ...), or None."""
    named = [
        p
        for p in sorted(folder.iterdir())
        if p.stem.lower() in SPLIT_FILE_STEMS[split]
        and (p.suffix.lower() in FORMATS or data.format != "auto")
    ]
    folders = [p.name for p in named if not p.is_file()]
    if folders:
        raise DataError(
            f"data folder {folder}: {', '.join(folders)} is a folder, not a file; the {split} "
            f"split must be one CSV/JSONL/Parquet file"
        )
    if len(named) > 1:
        listing = ", ".join(p.name for p in named)
        raise DataError(
            f"data folder {folder} has {len(named)} {split} files ({listing}); keep one of "
            f"them (or point data.path at the one to use)"
        )
    return named[0] if named else None


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
    found = {split: _split_file(path, split, data) for split in SPLIT_FILE_STEMS}
    if found["train"] is None:
        names = ", ".join(sorted(p.name for p in path.iterdir())) or "(empty)"
        raise DataError(
            f"data folder {path} has no train file (train.csv, train.jsonl or "
            f"train.parquet); it holds: {names}"
        )
    return {split: file for split, file in found.items() if file is not None}


def csv_header(path: Path) -> list[str]:
    """The column names of a CSV file (UTF-8, with or without a byte-order mark)."""
    with path.open(encoding="utf-8-sig", newline="") as handle:
        header = next(csv.reader(handle), [])
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise DataError(
            f"data file {path}: column {', '.join(map(repr, repeated))} appears more than once "
            f"in the header; give every column its own name"
        )
    return header


def columns_found(columns) -> str:
    """The columns a file has, for a missing-column error, with a hint when the file was
    evidently written with another delimiter (one column whose name holds ";", tab or "|")."""
    listed = f"columns found: {', '.join(map(repr, columns))}"
    if len(columns) == 1:
        for delimiter, name in ((";", "semicolon"), ("\t", "tab"), ("|", "pipe")):
            if delimiter in columns[0]:
                return (
                    f"{listed} (the file looks {name}-separated: CSV files must be "
                    f"comma-separated; re-save it with commas, or as JSONL or Parquet)"
                )
    return listed


def _read_options(path: Path, fmt: str) -> dict:
    """CSV cells are read as the strings written: no type guessing (1 stays "1", not 1.0 when
    a cell is blank) and no missing-value words ("None", "NA" and "null" are values); only an
    empty cell is missing."""
    if fmt != "csv":
        return {}
    header = csv_header(path)
    with path.open(encoding="utf-8-sig", newline="") as handle:
        rows = csv.reader(handle)
        next(rows, None)
        if not any(any(cell.strip() for cell in row) for row in rows):
            raise DataError(f"data file {path} has a header but no rows")
    features = Features({name: Value("string") for name in header})
    return {"features": features, "keep_default_na": False, "na_values": [""]}


def load_rows(path: Path, data: DataConfig) -> Dataset:
    """Read one CSV/JSONL/Parquet file with `datasets`; errors name the file and the fix."""
    fmt = _format_of(path, data)
    if path.stat().st_size == 0:
        raise DataError(f"data file {path} is empty: it needs a header and at least one row")
    try:
        options = _read_options(path, fmt)
        rows = load_dataset(fmt, data_files=str(path), split="train", **options)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - the readers raise many types; the file is the cause
        raise read_error(path, fmt, exc) from None
    if len(rows) == 0:
        raise DataError(f"data file {path} has a header but no rows")
    return rows


def _root_cause(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    return exc


def _bad_json_line(path: Path) -> str | None:
    """'line N: why' for the first line of a JSON Lines file that is not a JSON object."""
    with path.open(encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                if not isinstance(json.loads(line), dict):
                    return f"line {number}: not a JSON object (one object per line is needed)"
            except json.JSONDecodeError as exc:
                return f"line {number}: not valid JSON ({exc.msg} at column {exc.colno})"
    return None


def read_error(path: Path, fmt: str, exc: BaseException) -> DataError:
    """The reader's failure as a DataError that names the file, the cause and the fix."""
    cause = _root_cause(exc)
    if isinstance(cause, UnicodeDecodeError):
        return DataError(
            f"data file {path} is not UTF-8 text ({cause.reason} at byte {cause.start}); "
            f"re-save it as UTF-8"
        )
    if isinstance(cause, PermissionError | IsADirectoryError):
        return DataError(
            f"data file {path} cannot be read ({cause.strerror}): check its permissions"
        )
    where = _bad_json_line(path) if fmt == "json" and path.suffix.lower() == ".jsonl" else None
    if where:
        return DataError(f"data file {path}, {where}: fix that line or remove it")
    return DataError(f"data file {path} could not be read as {fmt}: {cause}")


def load_frame(path: Path, data: DataConfig) -> pd.DataFrame:
    """load_rows as a pandas frame."""
    return load_rows(path, data).to_pandas()


def require_text(rows: Dataset, column: str, path: Path, fix: str) -> None:
    """A DataError unless rows[column] holds strings (JSON and Parquet columns are typed)."""
    feature = rows.features[column]
    if not (isinstance(feature, Value) and feature.dtype in ("string", "large_string", "null")):
        kind = feature.dtype if isinstance(feature, Value) else type(feature).__name__.lower()
        raise DataError(f"data file {path}: column {column!r} holds {kind} values, not text; {fix}")


def content_sha256(paths: list[Path]) -> str:
    """sha256 over the data files' names and bytes (the data's identity)."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode())
        try:
            digest.update(path.read_bytes())
        except OSError as exc:
            raise DataError(
                f"data file {path} cannot be read ({exc.strerror or exc}): check that it exists "
                f"and its permissions"
            ) from None
    return digest.hexdigest()


def finish_splits(splits: dict[str, pd.DataFrame], data: DataConfig, cut: Cut) -> int:
    """Split in place: one table ('all') into train/validation/test, or a folder's missing
    splits out of train, with cut (stratified or random); then drop validation/test rows seen
    in train and refuse empty splits. Returns the leaked count."""
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


def log_dataset_inputs(
    run: TrackedRun, data: DataConfig, tables: dict[str, pd.DataFrame], targets: str
) -> None:
    """Each split as an MLflow dataset input (with its digest), named after the data file.
    The source is built as a local one: from a plain path MLflow would guess, and warn that
    two registered local source types match."""
    uri = json.dumps({"uri": redact(Path(data.path).resolve())})
    source = get_dataset_source_from_json(uri, source_type="local")
    inputs = []
    for name, table in tables.items():
        ds = mlflow.data.from_pandas(
            table, source=source, targets=targets, name=f"{Path(data.path).stem}-{name}"
        )
        inputs.append(
            DatasetInput(ds._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, name)])
        )
    run.client.log_inputs(run.run_id, datasets=inputs)
