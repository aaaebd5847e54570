"""Data files for every task kind: finding them, reading them, splitting and de-leaking them.

One file is split into train/validation/test (seeded); a folder gives its train, validation
and test files, and the splits it lacks are carved out of train. Texts of validation and test
that also occur in train are dropped (leakage). The content hash of the files is the data's
identity for re-run detection.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import mlflow
import pandas as pd
from datasets import load_dataset
from mlflow.entities import DatasetInput, InputTag
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from tasks.common.config import DataConfig
from tasks.common.errors import DataError
from tasks.common.tracking import TrackedRun, redact

SPLITS = ("train", "validation", "test")
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


def content_sha256(paths: list[Path]) -> str:
    """sha256 over the data files' names and bytes (the data's identity)."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
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
    """Each split as an MLflow dataset input (with its digest), named after the data file."""
    source = redact(Path(data.path).resolve())
    inputs = []
    for name, table in tables.items():
        ds = mlflow.data.from_pandas(
            table, source=source, targets=targets, name=f"{Path(data.path).stem}-{name}"
        )
        inputs.append(
            DatasetInput(ds._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, name)])
        )
    run.client.log_inputs(run.run_id, datasets=inputs)
