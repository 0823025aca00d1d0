"""Streaming row readers for local files and hub datasets.

Each reader yields ``(location, row)`` for rows it could decode and ``Quarantined`` for bytes it
could not, never holding a whole file in memory, and never dropping bytes without a record: every
part of a file ends up in a decoded row or in a quarantined one. Local JSON/JSONL is read here
rather than with ``datasets.load_dataset("json")`` because that loader fails a whole file on one
bad line and materialises JSON arrays in memory; hub ids go through ``datasets`` in streaming mode.

A file's layout comes from its name, never from its first line: ``.jsonl`` is one JSON value per
line; ``.json`` (or no known suffix) is one top-level array when it opens with ``[`` and JSON lines
otherwise; ``.parquet`` is Parquet.

Each reader can also read one source partition's share of a file (``longdata.sources.partitions``):
JSONL a byte range of whole lines, Parquet a range of row groups, a hub dataset a group of its
data files; locations stay those of the whole read.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from longdata.records import Quarantined

Row = tuple[str, Any] | Quarantined
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
READ_CHUNK = 8 << 20
# A bad element with no element boundary within this many characters after it swallows the rest
# of the array into one quarantined row instead of growing the buffer without bound.
MAX_ELEMENT_CHARS = 256 << 20
PREVIEW_CHARS = 2000
BOM = "\ufeff"
_decoder = json.JSONDecoder()
# What ``surrogateescape`` turns each undecodable byte into.
_UNDECODABLE_BYTE = re.compile("[\udc80-\udcff]")
# The characters that decide where a JSON value ends: the scanner looks at nothing else.
_STRUCTURE = re.compile(r'["\\\[\]{},\n]')


class NotRegularFileError(ValueError):
    """A source path that is a device, FIFO or socket rather than a file or directory."""


def iter_rows(path: str, split: str = "train") -> Iterator[Row]:
    """Rows of a local file, every data file of a local directory, or a hub dataset."""
    for _, rows in iter_source_files(path, split):
        yield from rows


def iter_source_files(path: str, split: str = "train") -> Iterator[tuple[str, Iterator[Row]]]:
    """(file label, its rows) for each file of a source, in a fixed order. A file is labelled by
    its path inside the source directory (its name for a single file, the id for a hub dataset)."""
    files = local_files(path)
    if files is None:
        yield path, iter_hub_rows(path, split)
    for label, file in files or ():
        yield label, iter_file_rows(file, label)


def local_files(path: str) -> list[tuple[str, Path]] | None:
    """(label, file) for each data file of a local file or directory, in reading order; None
    for a hub id."""
    local = Path(path)
    if local.is_dir():
        files = sorted(p for p in local.rglob("*") if p.suffix in LOCAL_SUFFIXES and p.is_file())
        if not files:
            raise FileNotFoundError(f"{path}: directory holds no {', '.join(LOCAL_SUFFIXES)} files")
        return [(file.relative_to(local).as_posix(), file) for file in files]
    if local.exists() and not local.is_file():
        # Opening a FIFO blocks until a writer appears and /dev/zero never ends: refuse both.
        raise NotRegularFileError(f"{path}: not a regular file or directory; refusing to read it")
    return [(local.name, local)] if local.exists() else None


def file_layout(path: Path) -> str:
    """``parquet``, ``jsonl`` or ``json_array``: how a local data file is read."""
    if path.suffix == ".parquet":
        return "parquet"
    if path.suffix == ".jsonl":
        return "jsonl"
    with path.open("rb") as handle:
        head = handle.read(4096).removeprefix(BOM.encode()).lstrip()
    return "json_array" if head.startswith(b"[") else "jsonl"


def iter_file_rows(path: Path, label: str | None = None) -> Iterator[Row]:
    """Rows of one file; locations start with ``label`` (default: the file's name)."""
    readers = {"parquet": iter_parquet, "jsonl": iter_jsonl, "json_array": iter_json_array}
    yield from readers[file_layout(path)](path, label)


def iter_jsonl(
    path: Path,
    label: str | None = None,
    byte_range: tuple[int, int | None] = (0, None),
    first_line: int = 1,
) -> Iterator[Row]:
    """Rows of the lines that start inside ``byte_range`` (a source partition's share: its
    bounds are line starts), numbered from ``first_line``."""
    name, (start, stop) = label or path.name, byte_range
    with path.open("rb") as handle:
        handle.seek(start)
        lines = handle if stop is None else _lines_before(handle, stop - start)
        for number, raw in enumerate(lines, start=first_line):
            if number == first_line and start == 0:
                raw = raw.removeprefix(BOM.encode())
            if not raw.strip():
                continue
            location = f"{name}:{number}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield Quarantined(
                    location,
                    f"not UTF-8: {exc.reason} at byte {exc.start}",
                    raw.decode("utf-8", "replace")[:PREVIEW_CHARS],
                )
                continue
            try:
                yield location, json.loads(text)
            except json.JSONDecodeError as exc:
                yield Quarantined(
                    location, f"invalid JSON: {exc.msg} at column {exc.colno}", text[:PREVIEW_CHARS]
                )
            except RecursionError:
                yield Quarantined(
                    location, "JSON nested too deeply to decode", text[:PREVIEW_CHARS]
                )


def _lines_before(handle, limit: int) -> Iterator[bytes]:
    """The lines of ``handle`` within its next ``limit`` bytes."""
    while limit > 0:
        line = handle.readline()
        if not line:
            return
        limit -= len(line)
        yield line


class _Window:
    """The undecoded rest of a file as text, read in chunks; ``text[position:]`` is still to
    read."""

    def __init__(self, handle):
        self.handle, self.text, self.position, self.at_eof = handle, "", 0, False
        self.first = True
        # Incremental, so a character split across two chunks is decoded whole rather than as
        # two undecodable halves that would quarantine a valid element.
        self.decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")

    def read_more(self) -> bool:
        chunk = self.handle.read(READ_CHUNK)
        # surrogateescape keeps undecodable bytes as lone surrogates, so one bad element is
        # found and quarantined instead of failing the whole array.
        decoded = self.decoder.decode(chunk, final=not chunk)
        if not chunk and not decoded:
            self.at_eof = True
            return False
        if self.first and decoded:
            decoded, self.first = decoded.removeprefix(BOM), False
        self.text = self.text[self.position :] + decoded
        self.position = 0
        return True

    def skip(self, chars: str) -> str:
        """Move past ``chars``; the next character, or "" at the end of the file."""
        while True:
            text, position = self.text, self.position
            while position < len(text) and text[position] in chars:
                position += 1
            self.position = position
            if position < len(text) or not self.read_more():
                return self.text[self.position] if self.position < len(self.text) else ""

    def element_end(self) -> int | None:
        """Where the JSON value starting at ``position`` ends: the first ``,`` or ``]`` outside
        strings and brackets, reading ahead as needed; None when the file ends first or the value
        runs past MAX_ELEMENT_CHARS. JSON forbids raw newlines inside strings, so a string still
        open at a newline began at a stray quote: scanning resumes after it as structure, and
        one missing quote cannot swallow the rest of a file laid out one element per line."""
        while True:
            end = _scan_element(self.text, self.position)
            if (
                end is not None
                or len(self.text) - self.position >= MAX_ELEMENT_CHARS
                or not self.read_more()
            ):
                return end


def _scan_element(text: str, start: int) -> int | None:
    open_brackets: list[str] = []
    # Where the open "[" and "{" are in open_brackets, so a closer finds its opener in constant
    # time: searching the stack made 200k-deep nesting quadratic.
    opened_at: dict[str, list[int]] = {"[": [], "{": []}
    position = start
    while True:
        in_string, skip_at, string_start = False, -1, 0
        for match in _STRUCTURE.finditer(text, position):
            at = match.start()
            if at == skip_at:
                continue  # the character after a backslash inside a string
            char = match.group()
            if in_string:
                if char == "\\":
                    skip_at = at + 1
                elif char == '"':
                    in_string = False
                elif char == "\n":
                    break  # an unterminated string: its opening quote was a stray one
            elif char == '"':
                in_string, string_start = True, at
            elif char in "[{":
                opened_at[char].append(len(open_brackets))
                open_brackets.append(char)
            elif char in "]}":
                opener = "[" if char == "]" else "{"
                if opened_at[opener]:  # a mismatched closer also closes what it skips over
                    since = opened_at[opener][-1]
                    for closed in open_brackets[since:]:
                        opened_at[closed].pop()
                    del open_brackets[since:]
                elif char == "]" and not open_brackets:
                    return at  # the end of the array
                # else a stray "]" inside an element: the element is not over, and ending it here
                # would turn the rest of the array into "content after the array"
            elif char == "," and not open_brackets:
                return at
        else:
            return None
        position = string_start + 1  # rescan what followed the stray quote as structure


def iter_json_array(path: Path, label: str | None = None) -> Iterator[Row]:
    """Elements of one top-level JSON array (the LongAlpaca-12k layout), decoded incrementally.

    A malformed element is quarantined alone and reading resumes at the next element boundary;
    anything after the closing bracket (a second array, stray text) is quarantined as one row."""
    name = label or path.name
    with path.open("rb") as handle:
        window = _Window(handle)
        if window.skip(" \t\r\n") != "[":
            yield Quarantined(name, "not a JSON array", window.text[:PREVIEW_CHARS])
            return
        window.position += 1
        index = 0
        while True:
            head = window.skip(" \t\r\n,")
            if head == "]":
                window.position += 1
                yield from _trailing_content(name, window)
                return
            if head == "":
                return  # cut short exactly between elements: nothing is lost, the tail was empty
            location = f"{name}[{index}]"
            index += 1
            try:
                element, end = _decoder.raw_decode(window.text, window.position)
            except (json.JSONDecodeError, RecursionError):
                # The element may only be cut by the chunk boundary: find its end, then decode
                # again.
                element_end = window.element_end()
                if element_end is None:
                    reason = (
                        "JSON array cut short inside this element"
                        if window.at_eof
                        else f"no JSON element boundary within {MAX_ELEMENT_CHARS:,} characters: "
                        "the rest of the array is quarantined as this one row"
                    )
                    yield Quarantined(
                        location,
                        reason,
                        window.text[window.position : window.position + PREVIEW_CHARS],
                    )
                    return
                try:
                    element, end = _decoder.raw_decode(window.text[:element_end], window.position)
                except json.JSONDecodeError as exc:
                    yield _bad_element(location, window, element_end, f"invalid JSON: {exc.msg}")
                    continue
                except RecursionError:
                    yield _bad_element(
                        location, window, element_end, "JSON nested too deeply to decode"
                    )
                    continue
            text = window.text[window.position : end]
            window.position = end
            if _has_undecodable_bytes(text):
                yield Quarantined(
                    location,
                    "not UTF-8: undecodable bytes in this element",
                    _readable(text)[:PREVIEW_CHARS],
                )
            else:
                yield location, element


def _bad_element(location: str, window: _Window, end: int, reason: str) -> Quarantined:
    text = window.text[window.position : end]
    window.position = end
    return Quarantined(
        location, f"{reason}; reading resumed after this element", _readable(text)[:PREVIEW_CHARS]
    )


def _trailing_content(name: str, window: _Window) -> Iterator[Quarantined]:
    if window.skip(" \t\r\n") == "":
        return
    preview = window.text[window.position : window.position + PREVIEW_CHARS]
    yield Quarantined(
        f"{name}[after the array]",
        "content after the end of the JSON array (a second array or trailing text); "
        "a .json file holds one array",
        _readable(preview),
    )


def _readable(text: str) -> str:
    """Text with the bytes surrogateescape kept put back and shown as replacement characters."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _has_undecodable_bytes(text: str) -> bool:
    return not text.isascii() and _UNDECODABLE_BYTE.search(text) is not None


def iter_parquet(
    path: Path, label: str | None = None, row_groups: range | None = None
) -> Iterator[Row]:
    """Rows of a Parquet file, or of the row groups ``row_groups`` only (a source partition's
    share), indexed by their row number in the whole file. Each row group is read on its own:
    the unread rows of a corrupt one are quarantined one by one (the footer gives their count)
    and the row groups after it are still read. A file whose footer pyarrow cannot read is
    quarantined as one row: its row count is unknowable."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    name = label or path.name
    try:
        file = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        yield Quarantined(f"{name}[0:]", f"{_unreadable(exc)}; the whole file quarantined", "")
        return
    groups = row_groups if row_groups is not None else range(file.metadata.num_row_groups)
    index = sum(file.metadata.row_group(g).num_rows for g in range(groups.start))
    for group in groups:
        end = index + file.metadata.row_group(group).num_rows
        try:
            for batch in file.iter_batches(batch_size=256, row_groups=[group]):
                for row in batch.to_pylist():
                    yield f"{name}[{index}]", row
                    index += 1
        except (pa.ArrowException, OSError) as exc:
            reason = f"{_unreadable(exc)}; row group {group} quarantined"
            for lost in range(index, end):
                yield Quarantined(f"{name}[{lost}]", reason, "")
        index = end


def _unreadable(exc: Exception) -> str:
    return f"unreadable Parquet ({type(exc).__name__}: {str(exc)[:300]})"


def open_hub_dataset(dataset_id: str, split: str):
    """The streaming ``datasets.IterableDataset`` of a hub id (or anything ``load_dataset``
    takes)."""
    import datasets

    try:
        return datasets.load_dataset(dataset_id, split=split, streaming=True)
    except Exception as exc:  # the hub raises many types; the user needs the id and the reason
        raise FileNotFoundError(
            f"{dataset_id}: not a local path and not loadable with "
            f"datasets.load_dataset ({type(exc).__name__}: {exc})"
        ) from exc


def iter_hub_rows(
    dataset_id: str, split: str, shards: tuple[int, int] | None = None, first_index: int = 0
) -> Iterator[Row]:
    """A hub dataset streamed row by row; with ``shards=(i, n)`` only the i-th of n contiguous
    groups of its data files (a source partition's share), indexed from ``first_index``."""
    rows = open_hub_dataset(dataset_id, split)
    if shards is not None:
        rows = rows.shard(num_shards=shards[1], index=shards[0], contiguous=True)
    for index, row in enumerate(rows, start=first_index):
        yield f"{dataset_id}[{index}]", row
