"""Giving back the pages of memory-mapped Arrow files once a step has read them.

`datasets` memory-maps every Arrow file it reads, and each page read through a mapping stays in
the process's page table: its resident memory (RSS, and a container's working set) grows with
every row read, to the size of the tables (1.3 GB of mapped pages when prepare_data saved 3M
rows), although the kernel could drop those pages at any time. `released(*tables)` tells the
kernel every `interval` seconds, and once more at the end, that this process no longer needs the
pages mapped from the files behind those tables (madvise MADV_DONTNEED): they leave the resident
set and stay in the page cache, where a later read finds them again (a minor fault, no disk).

Safe by construction: only read-only mappings of `.arrow` files that hold the tables' own
buffers are advised (their contents are the files' contents, so nothing can be lost), and only
while the tables are held, so a mapping cannot be unmapped and its addresses reused meanwhile.
Linux only; elsewhere it does nothing.
"""

from __future__ import annotations

import bisect
import ctypes
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

MADV_DONTNEED = 4  # Linux
RELEASE_BYTES = 64 * 2**20  # read between two releases by a step that releases as it goes
MAPS = Path("/proc/self/maps")
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
if _LIBC is not None:
    _LIBC.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


@dataclass(frozen=True)
class Mapping:
    """One read-only mapping of an Arrow file: [start, end) in this process's address space."""

    start: int
    end: int
    path: str


def arrow_mappings(maps: str) -> list[Mapping]:
    """The read-only mappings of `.arrow` files in a /proc/<pid>/maps listing, by address."""
    found = []
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or fields[1][1] != "-" or not fields[5].endswith(".arrow"):
            continue  # anonymous, writable or not an Arrow file: never advised
        start, end = (int(x, 16) for x in fields[0].split("-"))
        found.append(Mapping(start, end, fields[5]))
    return sorted(found, key=lambda m: m.start)


def _arrow_table(table) -> pa.Table:
    """The pyarrow table of a datasets Dataset (or a pyarrow table itself)."""
    data = getattr(table, "data", table)  # Dataset -> datasets.table.Table
    return getattr(data, "table", data)  # datasets.table.Table -> pa.Table


def buffer_addresses(tables) -> list[int]:
    """One buffer address per record batch of each table: every batch lies in one file."""
    addresses = []
    for table in tables:
        arrow = _arrow_table(table)
        if arrow.num_columns == 0:
            continue
        for chunk in arrow.column(0).chunks:
            buffers = [b for b in chunk.buffers() if b is not None and b.size]
            if buffers:
                addresses.append(buffers[-1].address)
    return addresses


def mappings_holding(addresses: list[int], mappings: list[Mapping]) -> list[Mapping]:
    """The mappings that hold any of the addresses."""
    starts = [m.start for m in mappings]
    held = {}
    for address in addresses:
        i = bisect.bisect_right(starts, address) - 1
        if i >= 0 and address < mappings[i].end:
            held[mappings[i].start] = mappings[i]
    return list(held.values())


def release(mappings: list[Mapping]) -> None:
    """Drop the mappings' pages from this process's resident set (they stay in the page cache)."""
    for m in mappings:
        _LIBC.madvise(m.start, m.end - m.start, MADV_DONTNEED)


class ReadBudget:
    """Counts the bytes a step reads; `spent` says when RELEASE_BYTES have been read since it
    last said so (time to release)."""

    def __init__(self) -> None:
        self.read = 0

    def spent(self, nbytes: int) -> bool:
        self.read += nbytes
        if self.read < RELEASE_BYTES:
            return False
        self.read = 0
        return True


def mappings_of(*tables) -> list[Mapping]:
    """The read-only Arrow file mappings that hold these tables (none off Linux, or in memory).
    Valid for as long as the tables are held."""
    if _LIBC is None or not MAPS.exists():
        return []
    return mappings_holding(buffer_addresses(tables), arrow_mappings(MAPS.read_text()))


def opened(table):
    """table (a Dataset just made or loaded) with the pages its opening read given back:
    `datasets` reads every record batch's header of a file it opens, and the kernel maps the
    pages around each one with it (fault-around), about half of a file of small batches."""
    release(mappings_of(table))
    return table


@contextmanager
def released(*tables, interval: float = 0.01) -> Iterator[None]:
    """While the block runs, every `interval` seconds and once at its end, give back the pages
    read from the Arrow files that hold these tables (Dataset or pyarrow Table objects). For
    reads in file order (a map, a save); a step that jumps about the file releases as it goes
    (datasets.RowTaker)."""
    mappings = mappings_of(*tables)
    if not mappings:  # in-memory tables: nothing mapped, nothing to give back
        yield
        return
    stop = threading.Event()

    def keep_releasing() -> None:
        while not stop.wait(interval):
            release(mappings)

    thread = threading.Thread(target=keep_releasing, name="arrow-pages", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        release(mappings)
