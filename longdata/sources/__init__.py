"""Sources: every recipe source kind becomes one stream of ``Conversation | Document |
Quarantined``.

``longalign`` rows use the messages schema and ``longalpaca`` rows the Alpaca schema; ``generic``
takes either (or ShareGPT) by its ``format``; ``text`` yields raw documents; ``antihaystack`` is
generated, not read (over generated prose or a real-text haystack).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from longdata.recipe import (
    AntiHaystackSource,
    FileSource,
    GenericSource,
    LongAlpacaSource,
    TextSource,
)
from longdata.records import Conversation, Document, Quarantined, RowError
from longdata.sources import text
from longdata.sources.partitions import Partition, iter_partition_rows
from longdata.sources.readers import iter_source_files
from longdata.sources.schemas import PARSERS

Record = Conversation | Document | Quarantined
SAMPLE_PREFIX = "builtin:sample/"


def schema_of(source: FileSource) -> str:
    if isinstance(source, GenericSource):
        return source.format
    return "alpaca" if isinstance(source, LongAlpacaSource) else "messages"


def read_source(
    source,
    *,
    cache_dir: Path,
    count_tokens: Callable[[str], int],
    partition: Partition | None = None,
    text_sources: Mapping[str, TextSource] = {},
) -> Iterator[Record]:
    """All records of one recipe source in a deterministic order, or only those of one of its
    partitions (``longdata.sources.partitions``), with the positions, locations and file labels
    the whole read gives them. ``text_sources`` are the recipe's ``kind: text`` sources by name,
    which an anti-haystack ``haystack`` entry may name."""
    if isinstance(source, AntiHaystackSource):
        from longdata.sources import antihaystack

        haystack = (
            load_haystack(source.haystack, cache_dir, text_sources) if source.haystack else None
        )
        yield from antihaystack.generate(
            count=source.count,
            min_tokens=source.length_range[0],
            max_tokens=source.length_range[1],
            depth_range=source.depth_range,
            needles=source.needles,
            tasks=source.tasks,
            zh_fraction=source.zh_fraction,
            seed=source.seed,
            count_tokens=count_tokens,
            indices=range(*partition.span) if partition else None,
            haystack=haystack,
        )
        return
    if partition is not None:
        files = [(partition.label, iter_partition_rows(partition))]
    elif isinstance(source, TextSource):
        files = text.iter_files(
            resolve_path(source, cache_dir), glob=source.glob, split=source.split
        )
    else:
        files = iter_source_files(resolve_path(source, cache_dir), source.split)
    if isinstance(source, TextSource):

        def make(row, location: str, position: int, file: str) -> Record:
            return text.make_document(row, location, position, source.text_field, file)
    else:
        parse = PARSERS[schema_of(source)]

        def make(row, location: str, position: int, file: str) -> Record:
            messages = parse(row, source.strip_messages)
            return Conversation(messages, location, position=position, file=file)

    position = (partition.first_position if partition else 0) - 1
    for file, rows in files:
        for item in rows:
            position += 1
            if isinstance(item, Quarantined):
                yield dataclasses.replace(item, file=file)
                continue
            location, row = item
            try:
                record = make(row, location, position, file)
            except RowError as exc:
                yield Quarantined(location, str(exc), _preview(row), file)
                continue
            except Exception as exc:  # one row must never stop the build: it is quarantined
                yield Quarantined(
                    location,
                    f"cannot normalise this row: {type(exc).__name__}: {str(exc)[:500]}",
                    _preview(row),
                    file,
                )
                continue
            yield record


def haystack_paths(
    entries: tuple[str, ...], cache_dir: Path, text_sources: Mapping[str, TextSource]
) -> list[tuple[str, TextSource | None]]:
    """Each haystack entry as (path to read, the text source it names or None for a plain path)."""
    resolved = []
    for entry in entries:
        named = text_sources.get(entry)
        resolved.append((resolve_path(named, cache_dir), named) if named else (entry, None))
    return resolved


def load_haystack(
    entries: tuple[str, ...], cache_dir: Path, text_sources: Mapping[str, TextSource]
):
    """The filler of an anti-haystack source: its entries' documents in the order given."""
    from longdata.sources.antihaystack import Haystack

    documents = []
    for path, named in haystack_paths(entries, cache_dir, text_sources):
        if named is None:
            documents.extend(d.text for d in text.haystack_documents(path))
        else:
            documents.extend(
                r.text
                for r in text.read_documents(
                    path, text_field=named.text_field, glob=named.glob, split=named.split
                )
                if isinstance(r, Document)
            )
    return Haystack.from_texts(documents, source=", ".join(entries))


def resolve_path(source: FileSource, cache_dir: Path) -> str:
    """The path to read; ``builtin:sample/<schema>`` is generated once into the cache."""
    if not source.path.startswith(SAMPLE_PREFIX):
        return source.path
    from longdata.sources.samples import SAMPLE_SCHEMAS

    schema = source.path.removeprefix(SAMPLE_PREFIX)
    if schema not in SAMPLE_SCHEMAS:
        raise FileNotFoundError(
            f"{source.path}: unknown sample schema; available: {', '.join(sorted(SAMPLE_SCHEMAS))}"
        )
    writer, suffix = SAMPLE_SCHEMAS[schema]
    spec = source.sample
    target = (
        cache_dir
        / "samples"
        / (
            f"{schema}-n{spec.rows}-c{spec.min_chars}-{spec.max_chars}-zh{spec.zh_fraction}-s{spec.seed}{suffix}"
        )
    )
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        # Concurrent builds sharing a cache may race to make the same file: each writes its own.
        partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
        writer(
            partial,
            spec.rows,
            seed=spec.seed,
            min_chars=spec.min_chars,
            max_chars=spec.max_chars,
            zh_fraction=spec.zh_fraction,
        )
        partial.replace(target)
    return str(target)


def _preview(row: object, limit: int = 2000) -> str:
    import json
    import reprlib

    try:
        text = json.dumps(row, ensure_ascii=False, default=str)
    except (TypeError, ValueError, RecursionError):
        text = reprlib.repr(row)
    return text[:limit]
