"""Streaming row readers for local files and hub datasets.

Each reader yields ``(location, row)`` for rows it could decode and ``Quarantined`` for bytes it
could not, never holding a whole file in memory. Local JSON/JSONL is read here rather than with
``datasets.load_dataset("json")`` because that loader fails a whole file on one bad line and
materialises JSON arrays in memory; hub ids go through ``datasets`` in streaming mode.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from longdata.records import Quarantined

Row = tuple[str, Any] | Quarantined
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
READ_CHUNK = 8 << 20
# An element that is still not decodable with this much text after it is malformed, not cut by
# the chunk boundary: beyond it we stop reading ahead and quarantine the remainder.
MAX_ELEMENT_CHARS = 256 << 20
_decoder = json.JSONDecoder()
# What ``surrogateescape`` turns each undecodable byte into.
_UNDECODABLE_BYTE = re.compile("[\udc80-\udcff]")


def iter_rows(path: str, split: str = "train") -> Iterator[Row]:
    """Rows of a local file, every data file of a local directory, or a hub dataset."""
    files = local_files(path)
    if files is None:
        yield from iter_hub_rows(path, split)
    for file in files or ():
        yield from iter_file_rows(file)


def local_files(path: str) -> list[Path] | None:
    """The data files of a local file or directory, in reading order; None for a hub id."""
    local = Path(path)
    if local.is_dir():
        files = sorted(p for p in local.rglob("*") if p.suffix in LOCAL_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"{path}: directory holds no {', '.join(LOCAL_SUFFIXES)} files")
        return files
    return [local] if local.exists() else None


def is_json_array(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(4096).lstrip().startswith(b"[")


def iter_file_rows(path: Path) -> Iterator[Row]:
    if path.suffix == ".parquet":
        yield from iter_parquet(path)
    elif is_json_array(path):
        yield from iter_json_array(path)
    else:
        yield from iter_jsonl(path)


def iter_jsonl(path: Path, byte_range: tuple[int, int | None] = (0, None),
               first_line: int = 1) -> Iterator[Row]:
    """Rows of the lines that start inside ``byte_range`` (a source partition's share: its
    bounds are line starts), numbered from ``first_line``."""
    start, stop = byte_range
    with path.open("rb") as handle:
        handle.seek(start)
        lines = handle if stop is None else _lines_before(handle, stop - start)
        for number, raw in enumerate(lines, start=first_line):
            if not raw.strip():
                continue
            location = f"{path.name}:{number}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield Quarantined(location, f"not UTF-8: {exc.reason} at byte {exc.start}",
                                  raw.decode("utf-8", "replace"))
                continue
            try:
                yield location, json.loads(text)
            except json.JSONDecodeError as exc:
                yield Quarantined(location, f"invalid JSON: {exc.msg} at column {exc.colno}", text)


def _lines_before(handle, limit: int) -> Iterator[bytes]:
    """The lines of ``handle`` within its next ``limit`` bytes."""
    while limit > 0:
        line = handle.readline()
        if not line:
            return
        limit -= len(line)
        yield line


def iter_json_array(path: Path) -> Iterator[Row]:
    """Elements of one top-level JSON array (the LongAlpaca-12k layout), decoded incrementally."""
    with path.open("rb") as handle:
        buffer, position, index, at_eof = "", 0, 0, False

        def read_more() -> bool:
            nonlocal buffer, position, at_eof
            chunk = handle.read(READ_CHUNK)
            if not chunk:
                at_eof = True
                return False
            # surrogateescape keeps undecodable bytes as lone surrogates, so one bad element is
            # found and quarantined instead of failing the whole array.
            buffer = buffer[position:] + chunk.decode("utf-8", "surrogateescape")
            position = 0
            return True

        def skip(chars: str) -> str:
            nonlocal position
            while True:
                while position < len(buffer) and buffer[position] in chars:
                    position += 1
                if position < len(buffer) or not read_more():
                    return buffer[position] if position < len(buffer) else ""

        if skip(" \t\r\n") != "[":
            yield Quarantined(f"{path.name}", "not a JSON array", buffer[:200])
            return
        position += 1
        while True:
            head = skip(" \t\r\n,")
            if head == "]":
                return
            if head == "":
                return  # cut short exactly between elements: nothing is lost, the tail was empty
            location = f"{path.name}[{index}]"
            while True:
                try:
                    element, end = _decoder.raw_decode(buffer, position)
                    break
                except json.JSONDecodeError as exc:
                    if len(buffer) - position < MAX_ELEMENT_CHARS and read_more():
                        continue
                    reason = ("JSON array cut short inside this element" if at_eof
                              else f"invalid JSON: {exc.msg}; the rest of the array cannot be re-synchronised")
                    yield Quarantined(location, reason, buffer[position:position + 2000])
                    return
            text = buffer[position:end]
            position = end
            index += 1
            if _has_undecodable_bytes(text):
                yield Quarantined(location, "not UTF-8: undecodable bytes in this element",
                                  text.encode("utf-8", "surrogateescape").decode("utf-8", "replace"))
            else:
                yield location, element


def _has_undecodable_bytes(text: str) -> bool:
    return not text.isascii() and _UNDECODABLE_BYTE.search(text) is not None


def iter_parquet(path: Path, row_groups: range | None = None) -> Iterator[Row]:
    """Rows of a Parquet file, or of the row groups ``row_groups`` only (a source partition's
    share), indexed by their row number in the whole file."""
    import pyarrow.parquet as pq

    file = pq.ParquetFile(path)
    index = sum(file.metadata.row_group(g).num_rows for g in range(row_groups.start)) if row_groups else 0
    groups = list(row_groups) if row_groups else None
    for batch in file.iter_batches(batch_size=256, row_groups=groups):
        for row in batch.to_pylist():
            yield f"{path.name}[{index}]", row
            index += 1


def open_hub_dataset(dataset_id: str, split: str):
    """The streaming ``datasets.IterableDataset`` of a hub id (or anything ``load_dataset`` takes)."""
    import datasets

    try:
        return datasets.load_dataset(dataset_id, split=split, streaming=True)
    except Exception as exc:  # the hub raises many types; the user needs the id and the reason
        raise FileNotFoundError(f"{dataset_id}: not a local path and not loadable with "
                                f"datasets.load_dataset ({type(exc).__name__}: {exc})") from exc


def iter_hub_rows(dataset_id: str, split: str, shards: tuple[int, int] | None = None,
                  first_index: int = 0) -> Iterator[Row]:
    """A hub dataset streamed row by row; with ``shards=(i, n)`` only the i-th of n contiguous
    groups of its data files (a source partition's share), indexed from ``first_index``."""
    rows = open_hub_dataset(dataset_id, split)
    if shards is not None:
        rows = rows.shard(num_shards=shards[1], index=shards[0], contiguous=True)
    for index, row in enumerate(rows, start=first_index):
        yield f"{dataset_id}[{index}]", row
