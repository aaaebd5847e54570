"""Pages of memory-mapped Arrow files given back once read (tasks/common/mapped_pages.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from datasets import Dataset, load_from_disk

from tasks.common import datasets as common
from tasks.common import mapped_pages
from tasks.common.mapped_pages import arrow_mappings, mappings_of, opened, released

LINUX = Path("/proc/self/smaps").exists()
needs_linux = pytest.mark.skipif(not LINUX, reason="needs Linux /proc and madvise")


def resident_mb(path_part: str) -> float:
    """MB of this process's resident pages mapped from files whose path holds path_part."""
    total, mapped = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if not fields[0].endswith(":"):
            mapped = len(fields) > 5 and path_part in fields[5]
        elif fields[0] == "Rss:" and mapped:
            total += int(fields[1])
    return total / 1024


@pytest.fixture
def mapped(tmp_path) -> Dataset:
    """A 300,000-row table (about 40 MB) saved and loaded back: memory-mapped, none of its
    pages read yet."""
    rows = 300_000
    Dataset.from_dict(
        {
            "text": [f"ticket {i}: the printer on floor {i % 9} jams again" for i in range(rows)],
            "n": np.arange(rows),
        }
    ).save_to_disk(str(tmp_path / "table"))
    table = load_from_disk(str(tmp_path / "table"))
    opened(table)
    return table


def test_only_read_only_arrow_file_mappings_are_ever_advised():
    maps = "\n".join(
        [
            "7f0000000000-7f0000100000 r--p 00000000 fe:00 11 /cache/a.arrow",
            "7f0000200000-7f0000300000 r--s 00000000 fe:00 12 /cache/b.arrow",
            "7f0000400000-7f0000500000 rw-p 00000000 fe:00 13 /cache/c.arrow",  # writable
            "7f0000600000-7f0000700000 r--p 00000000 fe:00 14 /lib/libarrow.so",
            "7f0000800000-7f0000900000 rw-p 00000000 00:00 0 ",  # anonymous
            "7f0000a00000-7f0000b00000 r--p 00000000 fe:00 15 /cache/a file.arrow",
        ]
    )
    found = arrow_mappings(maps)
    assert [m.path for m in found] == ["/cache/a.arrow", "/cache/b.arrow", "/cache/a file.arrow"]
    assert found[0].start == 0x7F0000000000 and found[0].end == 0x7F0000100000


def test_an_in_memory_table_has_no_mapping_to_advise():
    """madvise(MADV_DONTNEED) on anonymous memory would zero it: tables that live in memory
    must never be given to it."""
    in_memory = Dataset.from_dict({"text": ["a", "b"] * 50_000})
    assert mappings_of(in_memory) == []
    assert mappings_of(pa.table({"n": np.arange(100_000)})) == []


@needs_linux
def test_pages_read_are_given_back_and_the_rows_stay_the_same(mapped):
    name = Path(mapped.cache_files[0]["filename"]).name
    before = mapped.data.table.column("text").to_pylist()[::1000]
    assert resident_mb(name) > 10  # reading a column mapped the file's pages
    with released(mapped):
        total = int(np.sum(mapped.data.table.column("n").to_numpy()))
    assert resident_mb(name) < 1
    assert total == sum(range(300_000))
    assert mapped.data.table.column("text").to_pylist()[::1000] == before  # read back again


@needs_linux
def test_a_take_across_the_table_gives_pages_back_as_it_walks(mapped, monkeypatch):
    """Rows spread over the whole table touch every page of its file: RowTaker gives them back
    every RELEASE_BYTES of batches walked, and takes the same rows as Arrow does."""
    calls = []
    monkeypatch.setattr(common, "release", lambda mappings: calls.append(len(mappings)))
    monkeypatch.setattr(mapped_pages, "RELEASE_BYTES", 2**20)
    table = mapped.data.table
    positions = np.random.default_rng(0).permutation(len(table))[:20_000]
    taken = common.RowTaker(table).take(positions)
    assert taken.equals(table.take(pa.array(positions)).combine_chunks())
    assert len(calls) > 10 and set(calls) == {1}


@needs_linux
def test_a_gather_leaves_neither_file_resident(mapped):
    """After gather: the pages of the source (read in random order) and of the new file (read
    when it was opened) are given back; the gathered rows are the rows asked for."""
    source = Path(mapped.cache_files[0]["filename"]).name
    positions = np.random.default_rng(1).permutation(len(mapped))[:100_000]
    gathered = common.gather(mapped, positions, ["text"])
    made = Path(gathered.cache_files[0]["filename"]).name
    assert resident_mb(source) < 1 and resident_mb(made) < 1
    texts = gathered["text"]
    assert texts[:50] == [
        f"ticket {i}: the printer on floor {i % 9} jams again" for i in positions[:50]
    ]


@needs_linux
def test_a_map_function_gives_back_the_pages_of_each_batch(mapped, monkeypatch):
    """What a map's worker process runs: after each RELEASE_BYTES of Arrow batches (here each
    batch), the pages read are given back (the batch's rows are unchanged, a dict batch is left
    alone)."""
    monkeypatch.setattr(mapped_pages, "RELEASE_BYTES", 1)
    name = Path(mapped.cache_files[0]["filename"]).name
    seen = []
    function = common.ReleasingPages(lambda batch: seen.append(len(batch)) or {})
    table = mapped.data.table
    for start in range(0, table.num_rows, 100_000):
        batch = table.slice(start, 100_000)
        assert batch.column("text").to_pylist()[0].startswith(f"ticket {start}:")
        assert resident_mb(name) > 1
        function(batch)
        assert resident_mb(name) < 1
    assert function({"text": ["a"]}) == {}
    assert seen == [100_000] * 3 + [1]
