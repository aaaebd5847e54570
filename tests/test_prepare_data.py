"""prepare_data: reading, cleaning, splitting, leakage removal, tokenization, bad inputs."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from conftest import data_figures
from datasets import load_from_disk

from tasks.classification.data import CLASS_COUNTS_FILE, build_splits, check_labels, label_names
from tasks.common.config import DataConfig
from tasks.common.errors import DataError
from tasks.common.tracking import start_pipeline_run
from tasks.stages import prepare_data


def _rows(n_per_class: int, labels=("a", "b", "c")) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "text": [
                f"message number {i} about {label}" for label in labels for i in range(n_per_class)
            ],
            "label": [label for label in labels for _ in range(n_per_class)],
        }
    )


def test_single_file_split_is_stratified_seeded_and_disjoint(tmp_path):
    path = tmp_path / "d.csv"
    _rows(40).to_csv(path, index=False)
    data = DataConfig(path=str(path), split={"validation": 0.1, "test": 0.2})
    splits, dropped, sha = build_splits(data)
    assert {k: len(v) for k, v in splits.items()} == {"train": 84, "validation": 12, "test": 24}
    for split in splits.values():  # stratified: each class equally represented
        assert len(set(Counter(split["label"]).values())) == 1
    texts = [set(f["text"]) for f in splits.values()]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    again, _, sha2 = build_splits(data)
    assert list(again["test"]["text"]) == list(splits["test"]["text"]) and sha == sha2
    assert dropped == {"empty_text": 0, "missing_label": 0, "duplicates": 0, "leaked": 0}


def test_cleaning_strips_and_drops_empty_and_duplicate_texts(tmp_path):
    frame = _rows(20)
    extra = pd.DataFrame(
        {
            "text": ["  message number 0 about a  ", "", "   ", None, "new one"],
            "label": ["a", "a", "b", "c", None],
        }
    )
    path = tmp_path / "d.jsonl"
    pd.concat([frame, extra]).to_json(path, orient="records", lines=True)
    splits, dropped, _ = build_splits(DataConfig(path=str(path)))
    assert dropped == {"empty_text": 3, "missing_label": 1, "duplicates": 1, "leaked": 0}
    assert sum(len(f) for f in splits.values()) == 60
    assert all(t == t.strip() for f in splits.values() for t in f["text"])


def test_folder_splits_remove_texts_leaked_from_train(tmp_path):
    train, test = _rows(10), _rows(3)
    test.loc[0, "text"] = "a brand new test text"
    validation = pd.DataFrame(
        {
            "text": [
                "message number 1 about a",
                "fresh validation text",
                "another fresh one",
                "third fresh one",
            ],
            "label": ["a", "b", "c", "a"],
        }
    )
    train.to_parquet(tmp_path / "train.parquet")
    validation.to_parquet(tmp_path / "validation.parquet")
    test.to_parquet(tmp_path / "test.parquet")
    splits, dropped, _ = build_splits(DataConfig(path=str(tmp_path)))
    assert dropped["leaked"] == 8 + 1  # 8 test texts and 1 validation text were in train
    assert list(splits["test"]["text"]) == ["a brand new test text"]
    assert len(splits["validation"]) == 3 and len(splits["train"]) == 30


def test_folder_without_test_file_carves_one_from_train(tmp_path):
    _rows(30).to_csv(tmp_path / "train.csv", index=False)
    splits, _, _ = build_splits(
        DataConfig(path=str(tmp_path), split={"validation": 0.0, "test": 0.2})
    )
    assert set(splits) == {"train", "test"} and len(splits["test"]) == 18


def test_prepare_data_tokenizes_without_padding_and_logs(tiny_config):
    from conftest import tracked

    run_id = start_pipeline_run(tiny_config)
    prepared = prepare_data(tiny_config, run_id)
    run = tracked(tiny_config, run_id)
    names = label_names(run.stage, prepared)
    assert names == ["account", "billing", "shipping", "technical"]
    assert prepared.rows == {"train": 140, "validation": 20, "test": 40}
    folder = run.fetch(prepared.dataset)
    dataset = load_from_disk(str(folder / "tokenized"))
    lengths = {len(ids) for ids in dataset["train"]["input_ids"]}
    assert len(lengths) > 5  # dynamic padding later: no padding to max length now
    assert max(lengths) <= tiny_config.data.max_length
    for row in dataset["test"].select(range(5)):
        assert names[row["labels"]] == row["label"]
    assert json.loads((folder / "label_names.json").read_text()) == names

    logged = run.client.get_run(run_id)
    assert data_figures(run.client, run_id)["rows.train"] == 140  # a table, not a chart
    assert not [k for k in logged.data.metrics if k.startswith("data")]
    assert not [k for k in logged.data.metrics if "class_count" in k]  # a table, not charts
    table = json.loads(Path(run.client.download_artifacts(run_id, CLASS_COUNTS_FILE)).read_text())
    counts = {(s, label): n for s, label, n in table["data"]}
    assert table["columns"] == ["split", "label", "rows"] and counts["test", "billing"] == 10
    assert logged.data.tags["data.content_sha256"] == prepared.content_sha256
    contexts = {i.tags[0].value: i.dataset for i in logged.inputs.dataset_inputs}
    assert set(contexts) == {"train", "validation", "test"}
    assert all(ds.digest for ds in contexts.values())
    assert "tokenized" in {a.path.split("/")[-1] for a in run.client.list_artifacts(run_id, "data")}
    assert run.tracking.uri.startswith("sqlite:")


# ---- bad inputs: the exact message tells what, where and how to fix ------------------------


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError) as err:
        build_splits(DataConfig(path=str(tmp_path / "nope.csv")))
    assert str(err.value) == (
        f"data.path {str(tmp_path / 'nope.csv')!r} does not exist: point it at a CSV/JSONL/Parquet "
        "file or a folder with train/validation/test files"
    )


def test_empty_file(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("")
    with pytest.raises(
        DataError, match=r"^data file .*empty.csv is empty: it needs a header and at least one row$"
    ):
        build_splits(DataConfig(path=str(path)))


def test_unknown_format(tmp_path):
    path = tmp_path / "data.xlsx"
    path.write_text("x")
    with pytest.raises(DataError) as err:
        build_splits(DataConfig(path=str(path)))
    assert str(err.value) == (
        f"data file {path}: unknown format '.xlsx'; use .csv, .jsonl or "
        ".parquet, or set data.format to csv, json or parquet"
    )


def test_missing_column_lists_columns_found(tmp_path):
    path = tmp_path / "d.csv"
    pd.DataFrame({"body": ["x", "y"], "label": ["a", "b"]}).to_csv(path, index=False)
    with pytest.raises(DataError) as err:
        build_splits(DataConfig(path=str(path)))
    assert str(err.value) == (
        f"data file {path} has no column 'text'; columns found: 'body', "
        "'label'; set data.text_column / data.label_column"
    )


def test_only_empty_texts(tmp_path):
    path = tmp_path / "d.csv"
    pd.DataFrame({"text": ["  ", None], "label": ["a", "b"]}).to_csv(path, index=False)
    with pytest.raises(DataError) as err:
        build_splits(DataConfig(path=str(path)))
    assert str(err.value) == (
        f"data {path}: no rows left after dropping empty texts and missing "
        "labels (2 empty texts, 0 missing labels)"
    )


def test_one_class_only(tmp_path):
    path = tmp_path / "d.csv"
    _rows(20, labels=("only",)).to_csv(path, index=False)
    splits, _, _ = build_splits(DataConfig(path=str(path)))
    with pytest.raises(DataError) as err:
        check_labels(splits)
    assert str(err.value) == (
        "data: the training split has only one class ('only'); classification needs at least two"
    )


def test_class_in_test_but_not_in_train(tmp_path):
    _rows(10, labels=("a", "b")).to_csv(tmp_path / "train.csv", index=False)
    _rows(2, labels=("a", "zzz")).assign(text=lambda f: f["text"] + " test").to_csv(
        tmp_path / "test.csv", index=False
    )
    splits, _, _ = build_splits(
        DataConfig(path=str(tmp_path), split={"validation": 0.0, "test": 0.2})
    )
    with pytest.raises(DataError) as err:
        check_labels(splits)
    assert (
        str(err.value)
        == "data: the test split has classes not in train: 'zzz'; add training rows for them"
    )


def test_numeric_labels_become_names(tmp_path):
    path = tmp_path / "d.csv"
    pd.DataFrame(
        {"text": [f"t{i}" for i in range(30)], "label": [i % 3 for i in range(30)]}
    ).to_csv(path, index=False)
    splits, _, _ = build_splits(DataConfig(path=str(path)))
    assert check_labels(splits) == ["0", "1", "2"]


def test_non_utf8_file(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes("text,label\ncaf\xe9 au lait,a\nother,b\n".encode("latin-1"))
    with pytest.raises(
        DataError, match=r"^data file .*d.csv (is not UTF-8 text|could not be read as csv)"
    ):
        build_splits(DataConfig(path=str(path)))


def test_class_too_small_to_stratify(tmp_path):
    path = tmp_path / "d.csv"
    frame = pd.concat(
        [_rows(10, labels=("a", "b")), pd.DataFrame({"text": ["lonely"], "label": ["c"]})]
    )
    frame.to_csv(path, index=False)
    with pytest.raises(DataError) as err:
        build_splits(DataConfig(path=str(path)))
    assert str(err.value) == (
        "data: classes 'c' have fewer than 2 rows; a stratified split needs "
        "at least 2 rows per class (add rows)"
    )


# ---- memory: nothing held longer or copied bigger than it must be ---------------------------


def _mapped_arrow_files() -> set[str]:
    """The Arrow files this process has memory-mapped now (their read pages count in its RSS)."""
    lines = Path("/proc/self/maps").read_text().splitlines()
    return {Path(line.split()[-1]).name for line in lines if line.endswith(".arrow")}


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_prepare_data_lets_each_table_go_once_the_next_is_made(tiny_config, monkeypatch):
    """While tokenizing only the gathered splits are open (not the file read or the cleaned
    rows); while saving, not the gathered splits either."""
    import gc

    import datasets

    import tasks.classification.data as data

    seen = {}
    tokenize, save = data.tokenize, datasets.DatasetDict.save_to_disk

    def watched_tokenize(*args, **kwargs):
        seen["tokenize"] = _mapped_arrow_files()
        return tokenize(*args, **kwargs)

    def watched_save(self, *args, **kwargs):
        seen["save"] = _mapped_arrow_files()
        return save(self, *args, **kwargs)

    monkeypatch.setattr(data, "tokenize", watched_tokenize)
    monkeypatch.setattr(datasets.DatasetDict, "save_to_disk", watched_save)
    # files an earlier test of this process still maps (a Dataset in a reference cycle that
    # the collector has not reached: once a 'cache-*.arrow' of another test) are not this run's
    gc.collect()
    earlier = _mapped_arrow_files()
    prepare_data(tiny_config, start_pipeline_run(tiny_config))
    during_tokenize, during_save = seen["tokenize"] - earlier, seen["save"] - earlier
    assert during_tokenize and all(name.startswith("rows-") for name in during_tokenize)
    assert not any(name.startswith("rows-") for name in during_save)


def test_row_taker_takes_as_arrow_does_without_copying_the_table(monkeypatch):
    """Rows by position (repeats, any order) from a table of many record batches, equal to
    Table.take, with Arrow allocating about the rows taken, not a concatenated column."""
    import numpy as np
    import pyarrow as pa

    from tasks.common.datasets import RowTaker

    rows = 200_000
    text = pa.array([f"ticket {i} " + "x" * 100 for i in range(rows)])
    number = pa.array(np.arange(rows))
    batches = [
        pa.record_batch([text.slice(i, 1000), number.slice(i, 1000)], names=["text", "n"])
        for i in range(0, rows, 1000)
    ]
    table = pa.Table.from_batches(batches)
    positions = np.random.default_rng(0).integers(0, rows, 5000)
    positions[:3] = [7, 7, rows - 1]
    taker = RowTaker(table)
    previous = pa.default_memory_pool()
    pool = pa.proxy_memory_pool(previous)  # counts the peak of what is allocated through it
    pa.set_memory_pool(pool)
    try:
        taken = taker.take(positions)
        peak = pool.max_memory()
        same = taken.equals(table.take(pa.array(positions)).combine_chunks())
        del taken  # its buffers belong to pool: freed while pool lives
    finally:
        pa.set_memory_pool(previous)
    assert same
    assert peak < table.nbytes / 10
    assert taker.take(np.array([], dtype=np.int64)).num_rows == 0


def test_key_lookups_and_digests_read_chunk_by_chunk():
    """sorted_contains answers as np.isin; digests of sliced chunks (and of some rows) as the
    bytes written, digests with trailing zero bytes included."""
    import numpy as np
    import pyarrow as pa

    from tasks.common.datasets import digests, sorted_contains

    rng = np.random.default_rng(1)
    raw = [bytes(rng.integers(0, 256, 16, dtype=np.uint8)) for _ in range(3000)]
    raw[:3] = [bytes(16), bytes(15) + b"\x01", b"\x01" + bytes(15)]
    column = pa.chunked_array(
        [pa.array(raw[:1000], pa.binary()), pa.array(raw[900:], pa.binary()).slice(100)]
    )
    every = digests(column)
    assert every.tobytes() == b"".join(raw)
    some = np.array([2, 0, 0, 2999])
    assert digests(column, some).tobytes() == b"".join(raw[i] for i in some)
    for _ in range(20):
        known = every[rng.choice(3000, 500, replace=False)]
        asked = every[rng.choice(3000, 700)]
        assert (sorted_contains(np.sort(known), asked) == np.isin(asked, known)).all()
    assert not sorted_contains(every[:0], every[:4]).any()


def test_content_hash_reads_the_files_in_pieces(tmp_path, monkeypatch):
    import hashlib

    from tasks.common import datasets as common

    files = [tmp_path / "b.csv", tmp_path / "a.csv"]
    files[0].write_bytes(b"text,label\nhello,x\n" * 50)
    files[1].write_bytes(b"")
    whole = hashlib.sha256(b"a.csv" + b"b.csv" + files[0].read_bytes()).hexdigest()
    monkeypatch.setattr(common, "HASH_CHUNK_BYTES", 7)
    assert common.content_sha256(files) == whole


def test_stratified_cut_is_sklearns_train_test_split():
    """The same (rest, part) indices as sklearn's train_test_split(stratify=...) for random
    strata (class codes with gaps, uneven classes), shares and seeds."""
    import math

    import numpy as np
    from sklearn.model_selection import train_test_split

    from tasks.classification.data import stratified_cut

    rng = np.random.default_rng(0)
    compared = 0
    while compared < 150:
        classes = int(rng.integers(2, 9))
        codes = rng.choice(
            np.arange(classes) * int(rng.integers(1, 4)), int(rng.integers(20, 3000))
        )
        codes = np.concatenate([codes, np.unique(codes), np.unique(codes)]).astype(np.int32)
        share, seed = float(rng.choice([0.1, 0.15, 0.2, 0.5])), int(rng.integers(0, 1000))
        part_rows = math.ceil(share * len(codes))
        if min(part_rows, len(codes) - part_rows) < len(np.unique(codes)):
            continue
        want = train_test_split(
            np.arange(len(codes)), test_size=share, random_state=seed, stratify=codes
        )
        got = stratified_cut(codes, part_rows, seed)
        assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))
        compared += 1


def test_first_of_each_key_keeps_np_uniques_rows(tmp_path):
    """Duplicates dropped as np.unique(keys, return_index=True) drops them (the first of each
    key, in row order), keys with trailing zero bytes included."""
    import numpy as np
    from datasets import Dataset

    from tasks.common.datasets import Rows

    rng = np.random.default_rng(2)
    pool = [bytes(rng.integers(0, 256, 16, dtype=np.uint8)) for _ in range(300)]
    pool[:2] = [bytes(16), b"\x01" + bytes(15)]
    keys = np.array([pool[i] for i in rng.integers(0, 300, 2000)], dtype="S16")
    rows = Rows(Dataset.from_dict({"x": [0]}), np.arange(2000) * 3, keys)
    _, first = np.unique(keys, return_index=True)
    kept = rows.first_of_each_key()
    assert np.array_equal(kept.positions, np.sort(first) * 3)
    assert np.array_equal(kept.keys, keys[np.sort(first)])


def test_the_dataset_digest_is_md5_of_the_row_digests_in_split_order(tmp_path):
    """The MLflow digest of a split: md5 over each row's 16-byte digest of text and label, in
    the split's order (read from the gathered rows, no longer kept per row in memory)."""
    import hashlib

    from tasks.classification.data import COLUMNS, split_rows
    from tasks.common.datasets import ROW_SHA, sha16

    path = tmp_path / "d.csv"
    _rows(40).to_csv(path, index=False)
    splits, _, _ = split_rows(DataConfig(path=str(path)))
    for rows in splits.values():
        table, digest = rows.dataset_and_digest(COLUMNS)
        assert table.column_names == COLUMNS and ROW_SHA not in table.column_names
        md5 = hashlib.md5()
        for text, label in zip(table["text"], table["label"], strict=True):
            md5.update(sha16(f"{text}\0{label}"))
        assert digest == md5.hexdigest()[:8]
