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
    local = Path(path)
    if local.is_dir():
        files = sorted(p for p in local.rglob("*") if p.suffix in LOCAL_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"{path}: directory holds no {', '.join(LOCAL_SUFFIXES)} files")
        for file in files:
            yield from iter_file_rows(file)
    elif local.exists():
        yield from iter_file_rows(local)
    else:
        yield from iter_hub_rows(path, split)


def iter_file_rows(path: Path) -> Iterator[Row]:
    if path.suffix == ".parquet":
        yield from iter_parquet(path)
        return
    with path.open("rb") as handle:
        head = handle.read(4096).lstrip()
    if head.startswith(b"["):
        yield from iter_json_array(path)
    else:
        yield from iter_jsonl(path)


def iter_jsonl(path: Path) -> Iterator[Row]:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
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


def iter_parquet(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    index = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
        for row in batch.to_pylist():
            yield f"{path.name}[{index}]", row
            index += 1


def iter_hub_rows(dataset_id: str, split: str) -> Iterator[Row]:
    """A hub dataset (or anything ``datasets.load_dataset`` accepts), streamed row by row."""
    import datasets

    try:
        rows = datasets.load_dataset(dataset_id, split=split, streaming=True)
    except Exception as exc:  # the hub raises many types; the user needs the id and the reason
        raise FileNotFoundError(f"{dataset_id}: not a local path and not loadable with "
                                f"datasets.load_dataset ({type(exc).__name__}: {exc})") from exc
    for index, row in enumerate(rows):
        yield f"{dataset_id}[{index}]", row
