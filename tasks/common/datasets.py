"""Data files for every task kind: finding them, reading them, splitting and de-leaking them.

One file is split into train/validation/test (seeded); a folder gives its train, validation
and test files, and the splits it lacks are carved out of train. Texts of validation and test
that also occur in train are dropped (leakage). The content hash of the files is the data's
identity for re-run detection.

The rows stay in Arrow (memory-mapped by `datasets`) from the file to the saved splits: a
batched `map` cleans and digests them, and splitting, de-duplicating and de-leaking work on
small numpy arrays (row positions, 16-byte text digests, label codes: 24-26 bytes a row),
never on Python lists or pandas frames of the corpus. The pages each step reads from the
mapped files are given back as it goes (mapped_pages), so resident memory does not grow with
the tables.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, DatasetDict, Features, Value, load_dataset
from mlflow.data.dataset_source_registry import get_dataset_source_from_json
from mlflow.entities import DatasetInput, InputTag
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from tasks.common.config import DataConfig
from tasks.common.credentials import redact
from tasks.common.errors import DataError
from tasks.common.mapped_pages import ReadBudget, mappings_of, opened, release, released
from tasks.common.tracking import TrackedRun

SPLITS = ("train", "validation", "test")
KEY_SHA = "key_sha"  # column: 16-byte digest of what makes two rows the same example
ROW_SHA = "row_sha"  # column: 16-byte digest of the whole row (the MLflow dataset digest)
ROWS_PER_PROCESS = 100_000  # a map over fewer rows runs in one process: forking costs more
HASH_CHUNK_BYTES = 2**20
WRITER_BATCH_BYTES = 4 * 2**20  # record batches a map writes: see writer_batch_rows
GATHER_BATCH_ROWS = 50_000  # rows a gather takes at a time: each take walks the whole table
DATA_PROFILE_FILE = "data/profile.json"  # table: rows.<split>, dropped.<reason>, truncated.<split>
SPLIT_FILE_STEMS = {
    "train": ("train",),
    "validation": ("validation", "valid", "val", "dev"),
    "test": ("test",),
}
FORMATS = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


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
    return opened(rows)


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


def require_text(rows: Dataset, column: str, path: Path, fix: str) -> None:
    """A DataError unless rows[column] holds strings (JSON and Parquet columns are typed)."""
    feature = rows.features[column]
    if not (isinstance(feature, Value) and feature.dtype in ("string", "large_string", "null")):
        kind = feature.dtype if isinstance(feature, Value) else type(feature).__name__.lower()
        raise DataError(f"data file {path}: column {column!r} holds {kind} values, not text; {fix}")


def content_sha256(paths: list[Path]) -> str:
    """sha256 over the data files' names and bytes (the data's identity), read a megabyte at a
    time (a whole file in memory was the largest allocation of prepare_data)."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode())
        try:
            with path.open("rb") as file:
                while chunk := file.read(HASH_CHUNK_BYTES):
                    digest.update(chunk)
        except OSError as exc:
            raise DataError(
                f"data file {path} cannot be read ({exc.strerror or exc}): check that it exists "
                f"and its permissions"
            ) from None
    return digest.hexdigest()


def map_processes(rows: int) -> int | None:
    """num_proc for a `map` over `rows` rows: a process per ROWS_PER_PROCESS, at most one a CPU."""
    processes = min(os.cpu_count() or 1, rows // ROWS_PER_PROCESS)
    return processes if processes > 1 else None


TOKENIZER_THREADS = "TOKENIZERS_PARALLELISM"


def writer_batch_rows(table: Dataset) -> int:
    """Rows per record batch for a map over table to write: about WRITER_BATCH_BYTES of table's
    rows (datasets writes 1,000 by default, 130 KB of short texts, and the kernel maps the 64 KB
    around every page read from a mapped file: reading one small column, or each batch's header
    when a file is opened, then mapped about half of the file)."""
    size = sum(os.path.getsize(f["filename"]) for f in table.cache_files)
    if not size or not len(table):
        return 1000
    return int(np.clip(WRITER_BATCH_BYTES * len(table) / size, 1000, 100_000))


class ReleasingPages:
    """function(batch, ...), the pages of the file the batches were read from given back every
    RELEASE_BYTES of Arrow batches (mapped_pages): a map's worker processes read their shard in
    file order, and without this each one's resident memory grew to the size of its shard."""

    def __init__(self, function: Callable):
        self.function = function
        self.budget = ReadBudget()

    def __call__(self, batch, *args, **kwargs):
        try:
            return self.function(batch, *args, **kwargs)
        finally:
            if isinstance(batch, pa.Table) and self.budget.spent(batch.nbytes):
                release(mappings_of(batch))


def map_rows(rows: Dataset, function: Callable, num_proc: int | None = None, **kwargs) -> Dataset:
    """rows.map(function, ...) with the pages it reads given back (mapped_pages: in this process
    while it runs, in each worker as it goes, and those read opening the result) and record
    batches of about WRITER_BATCH_BYTES written (unless kwargs set writer_batch_size)."""
    kwargs.setdefault("writer_batch_size", writer_batch_rows(rows))
    with released(rows):
        return opened(rows.map(ReleasingPages(function), num_proc=num_proc, **kwargs))


def parallel_map(rows: Dataset, function: Callable, **kwargs) -> Dataset:
    """map_rows over map_processes(len(rows)) processes. datasets' map with num_proc sets
    TOKENIZERS_PARALLELISM=false for its workers, then puts back Python's os.environ mapping
    only: the C environment, which the Rust tokenizer reads, kept "false", and every later
    fast-tokenizer call in this process ran on one thread (1.7x slower on 2 cores: tokenizing,
    evaluation, serving checks). The variable is put back here."""
    before = os.environ.get(TOKENIZER_THREADS)
    try:
        return map_rows(rows, function, map_processes(len(rows)), **kwargs)
    finally:
        if before is None:
            os.environ.pop(TOKENIZER_THREADS, None)
            os.unsetenv(TOKENIZER_THREADS)
        else:
            os.environ[TOKENIZER_THREADS] = before


def sha16(text: str) -> bytes:
    """A 16-byte digest of text: rows are compared by it (a collision is below 1e-20 likely)."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def digests(column: pa.ChunkedArray | pa.Array, positions: np.ndarray | None = None) -> np.ndarray:
    """A column of 16-byte digests (the rows at positions, or all) as a numpy 'S16' array
    (equal digests compare equal). Filled chunk by chunk; ascending positions are picked chunk
    by chunk too: no whole-column temporaries."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    ascending = positions is not None and bool((np.diff(positions) >= 0).all())
    if positions is not None and not ascending:
        return digests(column)[positions]
    every = np.empty(len(column) if positions is None else len(positions), dtype="S16")
    start, filled = 0, 0
    for chunk in chunks:
        fixed = pc.cast(chunk, pa.binary(16))
        values = np.frombuffer(fixed.buffers()[1], dtype="S16")[fixed.offset :][: len(fixed)]
        if positions is None:
            every[start : start + len(fixed)] = values
        else:
            a, b = np.searchsorted(positions, [start, start + len(fixed)])
            every[filled : filled + b - a] = values[positions[a:b] - start]
            filled += b - a
        start += len(fixed)
    return every


class RowTaker:
    """Takes rows by position from a table's record batches, each batch's rows with that batch's
    own `take`. pyarrow's Table.take concatenates every chunk of a column first: a copy of the
    whole table (120 MB per million 120-character texts) for each 10,000 rows taken, which made
    gathering a split quadratic in its rows.

    A take walks the batches in file order, and rows spread over the whole table touch nearly
    every page of its memory-mapped file, so the pages read are given back every
    RELEASE_BYTES of batches walked (mapped_pages): resident memory stays flat, not the size
    of the table."""

    def __init__(self, table: pa.Table):
        self.batches = table.to_batches()  # they hold the file mappings for as long as we live
        sizes = [len(b) for b in self.batches]
        self.starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self.schema = table.schema
        self.mappings = mappings_of(table)

    def take(self, positions: np.ndarray) -> pa.Table:
        """The rows at positions, in that order."""
        if len(positions) == 0:
            return self.schema.empty_table()
        order = np.argsort(positions, kind="stable")
        ascending = positions[order]
        owner = np.searchsorted(self.starts, ascending, side="right") - 1
        firsts = np.flatnonzero(np.diff(owner, prepend=-1))  # where each batch's rows begin
        pieces, budget = [], ReadBudget()
        for a, b in zip(firsts, [*firsts[1:], len(ascending)], strict=True):
            batch = self.batches[owner[a]]
            pieces.append(batch.take(pa.array(ascending[a:b] - self.starts[owner[a]])))
            if budget.spent(batch.nbytes):
                release(self.mappings)
        release(self.mappings)
        rows = pa.Table.from_batches(pieces, schema=self.schema).combine_chunks()
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        return rows.take(pa.array(back))


def take_rows(batch: pa.Table, taker: RowTaker) -> pa.Table:
    """The rows at a batch's positions."""
    return taker.take(batch["position"].to_numpy())


def gather(table: Dataset, positions: np.ndarray, columns: list[str] | None = None) -> Dataset:
    """The rows of table at positions, in that order, as a new Dataset: a batched `map` over
    the positions takes each batch's rows (RowTaker; an indices mapping would gather row by row
    at every later read). table has no indices mapping (map and gather make none). Written
    beside the table's cache files when it has some."""
    columns = table.column_names if columns is None else columns
    positions = np.ascontiguousarray(positions, dtype=np.int64)
    key = hashlib.md5(positions.tobytes())
    key.update(json.dumps([table.cache_files, columns, table._fingerprint]).encode())
    cache = None
    if table.cache_files:
        folder = Path(table.cache_files[0]["filename"]).parent
        cache = str(folder / f"rows-{key.hexdigest()}.arrow")
    gathered = map_rows(
        Dataset.from_dict({"position": positions}).with_format("arrow"),
        take_rows,
        batched=True,
        batch_size=GATHER_BATCH_ROWS,
        fn_kwargs={"taker": RowTaker(table.data.table.select(columns))},
        remove_columns=["position"],
        writer_batch_size=writer_batch_rows(table),  # the rows' size, not the positions'
        cache_file_name=cache,
        new_fingerprint=f"rows-{key.hexdigest()}",
    )
    return gathered.with_format(None)


def save_splits(splits: DatasetDict, folder: Path) -> None:
    """splits.save_to_disk(folder), the pages it reads given back as it goes (mapped_pages)."""
    with released(*splits.values()):
        splits.save_to_disk(str(folder))


@dataclass(frozen=True)
class Rows:
    """Some rows of one cleaned table, by position, with their keys and (for a stratified cut)
    label codes: splitting and de-leaking move these small arrays (24-26 bytes a row), not the
    rows. Their content digests (ROW_SHA) stay in the table until the split is gathered."""

    table: Dataset
    positions: np.ndarray
    keys: np.ndarray  # KEY_SHA per row: rows with equal keys are the same example
    strata: np.ndarray | None = None  # a class code per row, for a stratified cut
    classes: tuple[str, ...] = ()  # the class of each code

    @classmethod
    def of(cls, table: Dataset, positions: np.ndarray) -> Rows:
        """The rows at positions of a table with KEY_SHA and ROW_SHA columns."""
        return cls(table, positions, digests(table.data.column(KEY_SHA), positions))

    def __len__(self) -> int:
        return len(self.positions)

    def take(self, where: np.ndarray) -> Rows:
        """The rows at `where` (positions into these rows)."""
        strata = None if self.strata is None else self.strata[where]
        return replace(self, positions=self.positions[where], keys=self.keys[where], strata=strata)

    def first_of_each_key(self) -> Rows:
        """The rows whose key has not occurred before (exact duplicates dropped, order kept):
        np.unique(keys, return_index=True)'s rows, without its copies of the keys."""
        order = np.argsort(self.keys, kind="stable")  # equal keys keep their row order
        ordered = self.keys[order]
        first = np.empty(len(order), dtype=bool)
        first[:1] = True
        np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
        del ordered
        return self.take(np.sort(order[first]))

    def dataset(self, columns: list[str]) -> Dataset:
        """These rows' columns, in their order, as a new Dataset (see gather)."""
        return gather(self.table, self.positions, columns)

    def dataset_and_digest(self, columns: list[str]) -> tuple[Dataset, str]:
        """dataset(columns), and the MLflow dataset digest: md5 over the rows' ROW_SHA digests
        in order (8 hex digits), read from the gathered split chunk by chunk."""
        table = gather(self.table, self.positions, [*columns, ROW_SHA])
        md5 = hashlib.md5()
        with released(table):
            for chunk in table.data.column(ROW_SHA).chunks:
                md5.update(digests(chunk).tobytes())
        return table.remove_columns(ROW_SHA), md5.hexdigest()[:8]


# cut(rows, share, seed) -> (rest, part): a stratified or a random seeded cut
Cut = Callable[[Rows, float, int], tuple[Rows, Rows]]


def finish_splits(splits: dict[str, Rows], data: DataConfig, cut: Cut) -> int:
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
    for name, rows in splits.items():
        if len(rows) == 0:
            raise DataError(
                f"data: the {name} split is empty after cleaning; add rows or change data.split"
            )
    return leaked


def remove_leakage(splits: dict[str, Rows]) -> int:
    """Drop validation/test rows whose key is in train (and validation keys seen in test).
    Returns the count. Each split's keys seen are sorted once and looked up by bisection (np.isin
    sorted their concatenation with a split's keys: several copies of every key at once)."""
    seen = [np.sort(splits["train"].keys)]
    dropped = 0
    for name in ("test", "validation"):
        if name not in splits:
            continue
        keys = splits[name].keys
        leaked = np.zeros(len(keys), dtype=bool)
        for ordered in seen:
            leaked |= sorted_contains(ordered, keys)
        dropped += int(leaked.sum())
        splits[name] = splits[name].take(np.flatnonzero(~leaked))
        seen.append(np.sort(splits[name].keys))
    return dropped


def sorted_contains(ordered: np.ndarray, values: np.ndarray) -> np.ndarray:
    """For each value, whether the sorted array `ordered` holds it."""
    if len(ordered) == 0:
        return np.zeros(len(values), dtype=bool)
    at = np.minimum(np.searchsorted(ordered, values), len(ordered) - 1)
    return ordered[at] == values


def log_dataset_inputs(
    run: TrackedRun, data: DataConfig, tables: dict[str, tuple[Dataset, str]], targets: str
) -> None:
    """Each split (a Dataset and its digest) as an MLflow dataset input, named after the data
    file. The source is built as a local one: from a plain path MLflow would guess, and warn
    that two registered local source types match."""
    uri = json.dumps({"uri": redact(Path(data.path).resolve())})
    source = get_dataset_source_from_json(uri, source_type="local")
    inputs = []
    for name, (table, digest) in tables.items():
        ds = mlflow.data.from_huggingface(
            table,
            source=source,
            targets=targets,
            name=f"{Path(data.path).stem}-{name}",
            digest=digest,
        )
        inputs.append(
            DatasetInput(ds._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, name)])
        )
    run.client.log_inputs(run.run_id, datasets=inputs)
