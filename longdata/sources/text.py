"""Raw documents: ``kind: text`` sources and the real-text haystacks of anti-haystack sources.

A document comes from one of two layouts:

- rows of JSONL/JSON/Parquet files (a local file, a directory of them, or a hub dataset), the
  document in ``text_field`` (``text`` in most pretraining corpora), read with the same
  streaming readers as chat sources;
- a directory of plain text files matched by ``glob``, one document per file, in sorted path
  order. A file that is not UTF-8 is quarantined with its reason, never decoded with
  replacement characters.

Documents are kept as written except that CRLF becomes LF; an empty one is quarantined.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from longdata.records import Document, Quarantined, RowError
from longdata.sources.readers import LOCAL_SUFFIXES, Row, iter_source_files

PREVIEW_CHARS = 2000


def iter_items(path: str, *, glob: str | None, split: str = "train") -> Iterator[Row]:
    """``(location, row)`` or ``Quarantined`` per document: a row is a str (a text file) or the
    JSON object holding the text."""
    for _, rows in iter_files(path, glob=glob, split=split):
        yield from rows


def iter_files(
    path: str, *, glob: str | None, split: str = "train"
) -> Iterator[tuple[str, Iterator[Row]]]:
    """(file label, its documents) per file of a text source, for the per-file row accounting."""
    local = Path(path)
    if glob is None:
        yield from iter_source_files(path, split)
        return
    if not local.is_dir():
        raise FileNotFoundError(f"{path}: glob {glob!r} is given but this is not a directory")
    root = local.resolve()
    files = sorted(p for p in local.glob(glob) if p.is_file())
    if not files:
        raise FileNotFoundError(f"{local}: no files match glob {glob!r}")
    for file in files:
        if not file.resolve().is_relative_to(root):
            raise FileNotFoundError(f"{file}: glob {glob!r} reaches outside {local}")
        label = file.relative_to(local).as_posix()
        yield label, iter([read_text_file(file, label)])


def read_text_file(file: Path, location: str) -> Row:
    raw = file.read_bytes()
    try:
        return location, raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return Quarantined(
            location,
            f"not UTF-8: {exc.reason} at byte {exc.start}",
            raw[:PREVIEW_CHARS].decode("utf-8", "replace"),
        )


def document_text(row: Any, text_field: str) -> str:
    """The document of one row (a str for a text file), normalised; RowError if unusable."""
    if isinstance(row, str):
        text = row
    elif isinstance(row, dict):
        if text_field not in row:
            raise RowError(f"no {text_field!r} field (fields: {', '.join(sorted(map(str, row)))})")
        text = row[text_field]
        if not isinstance(text, str):
            raise RowError(f"{text_field} must be a string, got {type(text).__name__}")
    else:
        raise RowError(f"row must be a JSON object, got {type(row).__name__}")
    text = text.replace("\r\n", "\n")
    if not text.strip():
        raise RowError("empty document")
    return text


def make_document(
    row: Any, location: str, position: int, text_field: str, file: str = ""
) -> Document:
    return Document(document_text(row, text_field), location, position=position, file=file)


def read_documents(
    path: str, *, text_field: str = "text", glob: str | None = None, split: str = "train"
) -> Iterator[Document | Quarantined]:
    """Every document under ``path`` in order, bad ones quarantined."""
    yield from _documents(iter_items(path, glob=glob, split=split), text_field)


def _documents(items: Iterator[Row], text_field: str) -> Iterator[Document | Quarantined]:
    for position, item in enumerate(items):
        if isinstance(item, Quarantined):
            yield item
            continue
        location, row = item
        try:
            document = make_document(row, location, position, text_field)
        except RowError as exc:
            yield Quarantined(location, str(exc), repr(row)[:PREVIEW_CHARS])
            continue
        yield document


def haystack_documents(path: str) -> Iterator[Document]:
    """The documents of one haystack path: a data file (or a directory of them) by its ``text``
    field, any other file as one plain-text document, a directory of such files in sorted
    order. Unusable documents are skipped: a haystack is filler, not training data to account
    for."""
    local = Path(path)
    if not local.exists():
        raise FileNotFoundError(f"haystack {path}: no such file or directory")
    if local.is_file() and local.suffix not in LOCAL_SUFFIXES:
        records = _documents(iter([read_text_file(local, local.name)]), "text")
    elif local.is_dir() and not any(p.suffix in LOCAL_SUFFIXES for p in local.rglob("*")):
        records = read_documents(path, glob="**/*")
    else:
        records = read_documents(path)
    for record in records:
        if isinstance(record, Document):
            yield record
