"""The rows a watch compares: the source now, recent traffic, and production's training rows.

Rows are compared as (stripped text, label) digests, the way prepare_data cleans them: empty
texts are left out and a row repeated is one row. Production's rows are its prepared splits
(train, validation, test: the cleaned rows of the source it was trained on), read from its
MLflow run once and cached by run id.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
from datasets import load_from_disk

from tasks.common.config import PipelineConfig
from tasks.common.datasets import find_split_files, load_rows, sha16
from tasks.common.errors import DataError
from tasks.common.tracking import Tracking

SPLITS = ("train", "validation", "test")
DATA_FILES = (".csv", ".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class Rows:
    """Texts (stripped, none empty) with their labels (None for traffic) and row digests."""

    texts: list[str]
    labels: list[str] | None
    digests: np.ndarray  # 'S16', one per (text, label) row

    @classmethod
    def of(cls, texts: list, labels: list | None) -> Rows:
        keep = [i for i, text in enumerate(texts) if isinstance(text, str) and text.strip()]
        texts = [texts[i].strip() for i in keep]
        labels = [str(labels[i]) for i in keep] if labels is not None else None
        keys = [f"{t}\x1f{labels[i]}" if labels else t for i, t in enumerate(texts)]
        return cls(texts, labels, np.array([sha16(k) for k in keys], dtype="S16"))

    def label_counts(self) -> dict[str, int]:
        names, counts = np.unique(np.array(self.labels or [], dtype=object), return_counts=True)
        return {str(n): int(c) for n, c in zip(names, counts, strict=True)}

    def where(self, mask: np.ndarray) -> Rows:
        labels = [x for x, m in zip(self.labels, mask, strict=True) if m] if self.labels else None
        texts = [x for x, m in zip(self.texts, mask, strict=True) if m]
        return Rows(texts, labels, self.digests[mask])


def read_table(path: Path, config: PipelineConfig, columns: list[str]):
    """One data file's columns; a missing column is a DataError naming the file and the key."""
    table = load_rows(path, config.data)
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DataError(
            f"watch: {path} has no column {', '.join(missing)} (columns: "
            f"{', '.join(table.column_names)}): set data.text_column / data.label_column"
        )
    return table


def source_rows(config: PipelineConfig) -> tuple[Rows, list[Path]]:
    """The watched source's labelled rows, all files together, and the files."""
    data = config.data.model_copy(update={"path": config.watch.source or config.data.path})
    files = list(find_split_files(data).values())
    texts: list = []
    labels: list = []
    for path in files:
        table = read_table(path, config, [data.text_column, data.label_column])
        texts += table[data.text_column]
        labels += table[data.label_column]
    return Rows.of(texts, labels), files


def traffic_rows(config: PipelineConfig) -> Rows | None:
    """Recent traffic (texts only): a file, or every data file of a folder; None when unset."""
    if config.watch.traffic is None:
        return None
    path = Path(config.watch.traffic)
    files = [path] if path.is_file() else []
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in DATA_FILES)
    if not files:
        raise DataError(
            f"watch.traffic {config.watch.traffic!r} is not a data file or a folder holding "
            f"CSV/JSONL/Parquet files: point it at the texts the production model served"
        )
    texts: list = []
    for file in files:
        texts += read_table(file, config, [config.data.text_column])[config.data.text_column]
    return Rows.of(texts, None)


def production_rows(tracking: Tracking, run_id: str, cache: Path) -> Rows:
    """Production's prepared rows (every split), from its run's `data` artifact."""
    folder = cache / run_id / "data"
    if not (folder / "tokenized").is_dir():
        cache.joinpath(run_id).mkdir(parents=True, exist_ok=True)
        mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="data", dst_path=str(cache / run_id),
            tracking_uri=tracking.uri,
        )  # fmt: skip
    splits = load_from_disk(str(folder / "tokenized"))
    texts: list = []
    labels: list = []
    for name in SPLITS:
        if name in splits:
            texts += splits[name]["text"]
            labels += splits[name]["label"]
    return Rows.of(texts, labels)


def production_model(tracking: Tracking, run_id: str, cache: Path) -> Path:
    """Production's merged model folder (transformers format), fetched once."""
    folder = cache / run_id / "merged_model"
    if not (folder / "config.json").is_file():
        mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="merged_model", dst_path=str(cache / run_id),
            tracking_uri=tracking.uri,
        )  # fmt: skip
    return folder
