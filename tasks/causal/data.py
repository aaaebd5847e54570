"""prepare_data for causal_lm: prompt/response or chat records -> masked, optionally packed tokens.

Splits saved (a DatasetDict under <data>/tokenized):
- train: input_ids, labels (and position_ids when packed: rows of exactly data.max_length);
- validation, test: input_ids, labels, plus `messages` (the prompt conversation as JSON),
  `prompt` (it rendered with the generation prompt) and `reference` (the response to match).
The tokenizer (with its chat template, the default one if it had none) is saved beside them:
every later stage and the served model format prompts with it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from datasets import Dataset, DatasetDict, load_from_disk
from jinja2 import TemplateError
from sklearn.model_selection import train_test_split
from transformers import AutoTokenizer

from tasks.causal.formatting import (
    Encoded,
    FormatError,
    conversation,
    encode,
    ensure_chat_template,
    pack,
    render_prompt,
)
from tasks.causal.modeling import check_base_model
from tasks.common.config import DataConfig
from tasks.common.credentials import redact
from tasks.common.datasets import (
    DATA_PROFILE_FILE,
    SPLITS,
    columns_found,
    content_sha256,
    find_split_files,
    finish_splits,
    load_frame,
    log_dataset_inputs,
)
from tasks.common.errors import DataError
from tasks.common.models import load_tokenizer
from tasks.common.stage import StageContext
from tasks.records import PreparedData

TOKENIZER_DIR = "tokenizer"


def record_columns(frame: pd.DataFrame, data: DataConfig, path: Path) -> tuple[str, ...]:
    """The columns this file's records come from: prompt + response, or messages."""
    if data.prompt_column in frame.columns and data.response_column in frame.columns:
        return data.prompt_column, data.response_column
    if data.messages_column in frame.columns:
        return (data.messages_column,)
    raise DataError(
        f"data file {path} has neither columns {data.prompt_column!r} and "
        f"{data.response_column!r} nor a {data.messages_column!r} column; "
        f"{columns_found(list(frame.columns))}; set data.prompt_column / data.response_column "
        f"or data.messages_column"
    )


def _is_blank(value) -> bool:
    if isinstance(value, str):
        return not value.strip()
    return value is None or (isinstance(value, float) and value != value)


def read_conversations(path: Path, data: DataConfig) -> tuple[pd.DataFrame, int]:
    """One file as a table of conversations (column `conversation`) keyed by their prompt
    (column `text`, JSON of every turn but the last); returns it and the count of blank rows."""
    frame = load_frame(path, data)
    columns = record_columns(frame, data, path)
    rows, blank = [], 0
    for number, record in enumerate(frame[list(columns)].to_dict("records"), start=1):
        if any(_is_blank(record[c]) for c in columns):
            blank += 1
            continue
        try:
            messages = conversation(
                record, data.prompt_column, data.response_column, data.messages_column
            )
        except FormatError as exc:
            raise DataError(f"data file {path}, record {number}: {exc}") from None
        rows.append({"text": json.dumps(messages[:-1]), "conversation": messages})
    if not rows:
        raise DataError(f"data file {path}: every record is blank ({blank} rows)")
    return pd.DataFrame(rows), blank


def random_split(frame: pd.DataFrame, share: float, seed: int):
    """Seeded cut of `share` of the rows; returns (rest, part)."""
    if len(frame) < 2:
        raise DataError(f"data: {len(frame)} record(s) cannot be split; add records")
    rest, part = train_test_split(frame, test_size=share, random_state=seed)
    return rest.reset_index(drop=True), part.reset_index(drop=True)


def build_conversation_splits(data: DataConfig):
    """Read, drop blanks and repeated prompts, split (seeded), de-leak; returns the splits,
    the drop counts and the content hash."""
    files = find_split_files(data)
    dropped = {"blank": 0, "duplicates": 0}
    splits: dict[str, pd.DataFrame] = {}
    for name, path in files.items():
        frame, blank = read_conversations(path, data)
        before = len(frame)
        splits[name] = frame.drop_duplicates(subset="text", keep="first").reset_index(drop=True)
        dropped["blank"] += blank
        dropped["duplicates"] += before - len(splits[name])
    dropped["leaked"] = finish_splits(splits, data, random_split)
    return splits, dropped, content_sha256(list(files.values()))


def tokenize_split(frame: pd.DataFrame, tokenizer, max_length: int, name: str):
    """Encode each conversation; drop (and count) those left with no response token."""
    kept, encoded, too_long = [], [], 0
    for i, messages in enumerate(frame["conversation"]):
        try:
            example = encode(tokenizer, messages, max_length)
        except (FormatError, TemplateError) as exc:
            raise DataError(
                f"data: {name} example {i + 1} ({json.dumps(messages)[:200]}...) cannot be "
                f"formatted with the chat template of model.name_or_path: {exc}; fix the record "
                f"(e.g. roles the template accepts) or use a model whose template fits the data"
            ) from None
        if example.trained_tokens == 0:
            too_long += 1
            continue
        kept.append(i)
        encoded.append(example)
    if not encoded:
        raise DataError(
            f"data: every {name} example's prompt fills data.max_length={max_length} tokens, "
            f"leaving no response token to learn; raise data.max_length"
        )
    return frame.iloc[kept].reset_index(drop=True), encoded, too_long


def to_dataset(frame: pd.DataFrame, encoded: list[Encoded], tokenizer) -> Dataset:
    prompts = [messages[:-1] for messages in frame["conversation"]]
    return Dataset.from_dict(
        {
            "input_ids": [e.input_ids for e in encoded],
            "labels": [e.labels for e in encoded],
            "messages": [json.dumps(p) for p in prompts],
            "prompt": [render_prompt(tokenizer, p) for p in prompts],
            "reference": [messages[-1]["content"] for messages in frame["conversation"]],
        }
    )


def encode_splits(splits: dict[str, pd.DataFrame], tokenizer, data: DataConfig):
    """Each split encoded (train packed when data.packing); returns the DatasetDict, the
    metrics and the count of examples dropped for having no response token left."""
    parts, metrics, too_long_total = {}, {}, 0
    for name in SPLITS:
        if name not in splits:
            continue
        frame, encoded, too_long = tokenize_split(splits[name], tokenizer, data.max_length, name)
        splits[name] = frame
        too_long_total += too_long
        metrics[f"truncated.{name}"] = sum(e.truncated for e in encoded)
        metrics[f"response_tokens.{name}"] = sum(e.trained_tokens for e in encoded)
        if name == "train" and data.packing:
            rows = pack(encoded, data.max_length, tokenizer.pad_token_id)
            real = sum(len(e.input_ids) for e in encoded)
            metrics["packed_rows"] = len(rows)
            metrics["packing_efficiency"] = real / (len(rows) * data.max_length)
            parts[name] = Dataset.from_list(rows)
        else:
            parts[name] = to_dataset(frame, encoded, tokenizer)
    return DatasetDict(parts), metrics, too_long_total


def prepare_data(stage: StageContext) -> PreparedData:
    """Read the records, split, format with the chat template, mask prompts, pack; log it."""
    config, run, data = stage.config, stage.run, stage.config.data
    check_base_model(config.model, config.data.max_length)
    splits, dropped, content_sha = build_conversation_splits(data)
    tokenizer = load_tokenizer(config.model)
    default_template = ensure_chat_template(tokenizer)
    dataset, metrics, dropped["too_long"] = encode_splits(splits, tokenizer, data)
    out_dir = stage.stage_dir("data")
    dataset.save_to_disk(str(out_dir / "tokenized"))
    tokenizer.save_pretrained(str(out_dir / TOKENIZER_DIR))
    rows = {name: len(frame) for name, frame in splits.items()}
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
    tables = {
        name: pd.DataFrame(
            {"prompt": frame["text"], "response": [m[-1]["content"] for m in frame["conversation"]]}
        )
        for name, frame in splits.items()
    }
    log_dataset_inputs(run, data, tables, targets="response")
    ref = run.log_folder(out_dir, "data")
    return PreparedData(dataset=ref, rows=rows, content_sha256=content_sha, dropped=dropped)


def load_split(stage: StageContext, data: PreparedData, name: str):
    """One tokenized split of a prepared causal dataset."""
    return load_from_disk(str(stage.fetch(data.dataset) / "tokenized"))[name]


def load_data_tokenizer(stage: StageContext, data: PreparedData):
    """The tokenizer prepare_data formatted with (chat template and pad token set)."""
    return AutoTokenizer.from_pretrained(str(stage.fetch(data.dataset) / TOKENIZER_DIR))
