"""prepare_data for causal_lm: prompt/response or chat records -> masked, optionally packed tokens.

Splits saved (a DatasetDict under <data>/tokenized):
- train: input_ids, labels (and position_ids when packed: rows of exactly data.max_length);
- validation, test: input_ids, labels, plus `messages` (the prompt conversation as JSON),
  `prompt` (it rendered with the generation prompt) and `reference` (the response to match).
The tokenizer (with its chat template, the default one if it had none) is saved beside them:
every later stage and the served model format prompts with it.

The records stream as in classification: batched `map`s turn each file's records into
conversations (JSON) and then into tokens, splitting and de-duplicating move row positions, and
packing places examples by their lengths alone before one pass writes the packed rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
from datasets import Dataset, DatasetDict, Features, List, Value, load_from_disk
from jinja2 import TemplateError
from sklearn.model_selection import train_test_split
from transformers import AutoTokenizer

from tasks.causal.formatting import (
    IGNORE_INDEX,
    FormatError,
    conversation,
    encode,
    ensure_chat_template,
    render_prompt,
)
from tasks.causal.modeling import check_base_model
from tasks.common.config import DataConfig
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
    gather,
    load_rows,
    log_dataset_inputs,
    parallel_map,
    save_splits,
    sha16,
)
from tasks.common.errors import DataError
from tasks.common.mapped_pages import released
from tasks.common.models import load_tokenizer
from tasks.common.stage import StageContext
from tasks.records import PreparedData

TOKENIZER_DIR = "tokenizer"
PACKED = Features(
    {
        "input_ids": List(Value("int32")),
        "labels": List(Value("int64")),
        "position_ids": List(Value("int64")),
    }
)


def record_columns(columns: list[str], data: DataConfig, path: Path) -> tuple[str, ...]:
    """The columns this file's records come from: prompt + response, or messages."""
    if data.prompt_column in columns and data.response_column in columns:
        return data.prompt_column, data.response_column
    if data.messages_column in columns:
        return (data.messages_column,)
    raise DataError(
        f"data file {path} has neither columns {data.prompt_column!r} and "
        f"{data.response_column!r} nor a {data.messages_column!r} column; "
        f"{columns_found(list(columns))}; set data.prompt_column / data.response_column "
        f"or data.messages_column"
    )


def _is_blank(value) -> bool:
    if isinstance(value, str):
        return not value.strip()
    return value is None or (isinstance(value, float) and value != value)


def records_batch(batch: dict, indices: list[int], columns: tuple[str, ...], data: DataConfig):
    """Each record as its conversation (JSON), keyed by its prompt (`text`: JSON of every turn
    but the last); blank records and bad ones (`error`, with the record number) flagged."""
    out: dict[str, list] = {
        k: [] for k in ("text", "conversation", "response", "blank", "error", KEY_SHA, ROW_SHA)
    }
    for row, index in enumerate(indices):
        record = {c: batch[c][row] for c in columns}
        messages, error = None, None
        if not any(_is_blank(record[c]) for c in columns):
            try:
                messages = conversation(
                    record, data.prompt_column, data.response_column, data.messages_column
                )
            except FormatError as exc:
                error = f"record {index + 1}: {exc}"
        key = json.dumps(messages[:-1]) if messages else ""
        whole = json.dumps(messages) if messages else ""
        out["text"].append(key)
        out["conversation"].append(whole)
        out["response"].append(messages[-1]["content"] if messages else "")
        out["blank"].append(messages is None and error is None)
        out["error"].append(error)
        out[KEY_SHA].append(sha16(key))
        out[ROW_SHA].append(sha16(whole))
    return out


def first_error(table: Dataset) -> str | None:
    """The first non-empty `error` of a table (in row order), or None."""
    errors = table.data.column("error")
    if errors.null_count == len(errors):
        return None
    return pc.drop_null(errors)[0].as_py()


def read_conversations(path: Path, data: DataConfig) -> tuple[Rows, int]:
    """One file's records as conversations keyed by their prompt; returns the rows that are
    not blank and the count of blank ones."""
    rows = load_rows(path, data)
    columns = record_columns(rows.column_names, data, path)
    table = parallel_map(
        rows,
        records_batch,
        batched=True,
        with_indices=True,
        fn_kwargs={"columns": columns, "data": data},
        remove_columns=rows.column_names,
        desc="reading records",
    )
    with released(table):  # the columns read here: errors, blanks, digests
        error = first_error(table)
        if error:
            raise DataError(f"data file {path}, {error}") from None
        blank = table.data.column("blank").to_numpy(zero_copy_only=False)
        if blank.all():
            raise DataError(f"data file {path}: every record is blank ({int(blank.sum())} rows)")
        return Rows.of(table, np.flatnonzero(~blank)), int(blank.sum())


def random_split(rows: Rows, share: float, seed: int) -> tuple[Rows, Rows]:
    """Seeded cut of `share` of the rows; returns (rest, part)."""
    if len(rows) < 2:
        raise DataError(f"data: {len(rows)} record(s) cannot be split; add records")
    rest, part = train_test_split(np.arange(len(rows)), test_size=share, random_state=seed)
    return rows.take(rest), rows.take(part)


def build_conversation_splits(data: DataConfig) -> tuple[dict[str, Rows], dict[str, int], str]:
    """Read, drop blanks and repeated prompts, split (seeded), de-leak; returns the splits,
    the drop counts and the content hash."""
    files = find_split_files(data)
    dropped = {"blank": 0, "duplicates": 0}
    splits: dict[str, Rows] = {}
    for name, path in files.items():
        every, blank = read_conversations(path, data)
        splits[name] = every.first_of_each_key()
        dropped["blank"] += blank
        dropped["duplicates"] += len(every) - len(splits[name])
    dropped["leaked"] = finish_splits(splits, data, random_split)
    return splits, dropped, content_sha256(list(files.values()))


def encode_batch(
    batch: dict, indices: list[int], tokenizer, max_length: int, name: str, prompts: bool
):
    """Encode each conversation (prompt tokens labelled -100) and, when `prompts`, render its
    prompt; flag those that cannot be formatted (`error`), count truncated and response tokens."""
    out: dict[str, list] = {
        k: []
        for k in ("input_ids", "labels", "messages", "prompt", "reference")
        + ("truncated", "trained", "error")
    }
    for whole, index in zip(batch["conversation"], indices, strict=True):
        messages = json.loads(whole)
        try:
            example = encode(tokenizer, messages, max_length)
            prompt = render_prompt(tokenizer, messages[:-1]) if prompts else ""
        except (FormatError, TemplateError) as exc:
            example, prompt = None, ""
            out["error"].append(
                f"data: {name} example {index + 1} ({whole[:200]}...) cannot be formatted with "
                f"the chat template of model.name_or_path: {exc}; fix the record (e.g. roles "
                f"the template accepts) or use a model whose template fits the data"
            )
        else:
            out["error"].append(None)
        out["input_ids"].append(example.input_ids if example else [])
        out["labels"].append(example.labels if example else [])
        out["messages"].append(json.dumps(messages[:-1]))
        out["prompt"].append(prompt)
        out["reference"].append(messages[-1]["content"])
        out["truncated"].append(bool(example and example.truncated))
        out["trained"].append(example.trained_tokens if example else 0)
    return out


def tokenize_split(rows: Rows, tokenizer, max_length: int, name: str, prompts: bool = True):
    """Encode each conversation; drop (and count) those left with no response token. Returns
    the kept rows, their encoded Dataset and the dropped count."""
    options = {"tokenizer": tokenizer, "max_length": max_length, "name": name, "prompts": prompts}
    encoded = parallel_map(
        rows.dataset(["conversation"]),
        encode_batch,
        batched=True,
        with_indices=True,
        fn_kwargs=options,
        remove_columns=["conversation"],
        desc=f"tokenizing {name}",
    )
    error = first_error(encoded)
    if error:
        raise DataError(error)
    kept = np.flatnonzero(encoded.data.column("trained").to_numpy() > 0)
    if len(kept) == 0:
        raise DataError(
            f"data: every {name} example's prompt fills data.max_length={max_length} tokens, "
            f"leaving no response token to learn; raise data.max_length"
        )
    encoded = encoded.remove_columns("error")
    if len(kept) < len(rows):
        encoded = gather(encoded, kept)
    return rows.take(kept), encoded, len(rows) - len(kept)


def first_fit_bins(lengths: np.ndarray, max_length: int) -> np.ndarray:
    """formatting.pack's placement (first fit, longest first, ties in order) in O(n log n):
    a max-tree over the bins' free room finds the first bin with room; unopened bins have all
    their room and come after the opened ones, so the first fit may open the next bin."""
    size = 1
    while size < max(len(lengths), 1):
        size *= 2
    room = [max_length] * (2 * size)
    bins = np.empty(len(lengths), dtype=np.int64)
    for i in np.argsort(-lengths, kind="stable").tolist():
        need, node = int(lengths[i]), 1
        while node < size:
            node = 2 * node if room[2 * node] >= need else 2 * node + 1
        bins[i] = node - size
        room[node] -= need
        node //= 2
        while node:
            room[node] = max(room[2 * node], room[2 * node + 1])
            node //= 2
    return bins


def packed_rows(ordered: Dataset, counts: np.ndarray, max_length: int, pad_id: int):
    """Rows of exactly max_length tokens from the examples in bin order (`counts` per bin):
    position ids restart per example, the first token of each is not predicted, and the
    padding at the end is one more "example"."""
    batches = ordered.iter(batch_size=1024)
    pending: dict[str, list] = {"input_ids": [], "labels": []}
    for count in counts.tolist():
        while len(pending["input_ids"]) < count:
            batch = next(batches)
            pending["input_ids"] += batch["input_ids"]
            pending["labels"] += batch["labels"]
        input_ids, labels, position_ids = [], [], []
        for ids, example_labels in zip(
            pending["input_ids"][:count], pending["labels"][:count], strict=True
        ):
            input_ids += ids
            labels += [IGNORE_INDEX, *example_labels[1:]]
            position_ids += list(range(len(ids)))
        del pending["input_ids"][:count], pending["labels"][:count]
        free = max_length - len(input_ids)
        yield {
            "input_ids": input_ids + [pad_id] * free,
            "labels": labels + [IGNORE_INDEX] * free,
            "position_ids": position_ids + list(range(free)),
        }


def pack_split(encoded: Dataset, max_length: int, pad_id: int) -> Dataset:
    """Pack whole examples into rows of max_length (formatting.pack, streamed)."""
    lengths = pc.list_value_length(encoded.data.column("input_ids")).to_numpy()
    bins = first_fit_bins(lengths, max_length)
    order = np.lexsort((np.arange(len(bins)), bins))  # by bin, members in example order
    ordered = gather(encoded, order, ["input_ids", "labels"])
    counts = np.bincount(bins)
    return Dataset.from_generator(
        packed_rows,
        features=PACKED,
        gen_kwargs={
            "ordered": ordered,
            "counts": counts,
            "max_length": max_length,
            "pad_id": pad_id,
        },
    )


def encode_splits(splits: dict[str, Rows], tokenizer, data: DataConfig):
    """Each split encoded (train packed when data.packing); returns the DatasetDict, the
    metrics and the count of examples dropped for having no response token left."""
    parts, metrics, too_long_total = {}, {}, 0
    for name in SPLITS:
        if name not in splits:
            continue
        packed = name == "train" and data.packing
        rows, encoded, too_long = tokenize_split(
            splits[name], tokenizer, data.max_length, name, prompts=not packed
        )
        splits[name] = rows
        too_long_total += too_long
        metrics[f"truncated.{name}"] = int(
            pc.sum(encoded.with_format("arrow")["truncated"]).as_py()
        )
        metrics[f"response_tokens.{name}"] = int(
            pc.sum(encoded.with_format("arrow")["trained"]).as_py()
        )
        encoded = encoded.remove_columns(["truncated", "trained"])
        if packed:
            parts[name] = pack_split(encoded, data.max_length, tokenizer.pad_token_id)
            real = int(
                pc.sum(pc.list_value_length(encoded.with_format("arrow")["input_ids"])).as_py()
            )
            metrics["packed_rows"] = len(parts[name])
            metrics["packing_efficiency"] = real / (len(parts[name]) * data.max_length)
        else:
            parts[name] = encoded
    return DatasetDict(parts), metrics, too_long_total


def prepare_data(stage: StageContext) -> PreparedData:
    """Read the records, split, format with the chat template, mask prompts, pack; log it.
    The records are let go once encoded, the encoded splits once saved (see classification's
    prepare_data)."""
    config, run, data = stage.config, stage.run, stage.config.data
    check_base_model(config.model, config.data.max_length)
    splits, dropped, content_sha = build_conversation_splits(data)
    tables = {}
    for name, rows in splits.items():
        table, digest = rows.dataset_and_digest(["text", "response"])
        tables[name] = (table.rename_column("text", "prompt"), digest)
    log_dataset_inputs(run, data, tables, targets="response")
    del tables
    tokenizer = load_tokenizer(config.model)
    default_template = ensure_chat_template(tokenizer)
    dataset, metrics, dropped["too_long"] = encode_splits(splits, tokenizer, data)
    rows = {name: len(split) for name, split in splits.items()}
    del splits
    out_dir = stage.stage_dir("data")
    save_splits(dataset, out_dir / "tokenized")
    del dataset
    tokenizer.save_pretrained(str(out_dir / TOKENIZER_DIR))
    metrics |= {f"rows.{k}": v for k, v in rows.items()}
    metrics |= {f"dropped.{k}": v for k, v in dropped.items()}
    run.log_figures(metrics, DATA_PROFILE_FILE)
    run.set_tags(
        {
            "task": config.task,
            "data.content_sha256": content_sha,
            "data.path": redact(data.path),
            "data.chat_template": "default" if default_template else "tokenizer",
        }
    )
    ref = run.log_folder(out_dir, "data")
    return PreparedData(dataset=ref, rows=rows, content_sha256=content_sha, dropped=dropped)


def load_split(stage: StageContext, data: PreparedData, name: str):
    """One tokenized split of a prepared causal dataset."""
    return load_from_disk(str(stage.fetch(data.dataset) / "tokenized"))[name]


def load_data_tokenizer(stage: StageContext, data: PreparedData):
    """The tokenizer prepare_data formatted with (chat template and pad token set)."""
    return AutoTokenizer.from_pretrained(str(stage.fetch(data.dataset) / TOKENIZER_DIR))
