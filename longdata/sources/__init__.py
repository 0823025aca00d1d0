"""Sources: every recipe source kind becomes one stream of ``Conversation | Quarantined``.

``longalign`` rows use the messages schema and ``longalpaca`` rows the Alpaca schema; ``generic``
takes either (or ShareGPT) by its ``format``; ``antihaystack`` is generated, not read.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

from longdata.recipe import AntiHaystackSource, FileSource, GenericSource, LongAlpacaSource
from longdata.records import Conversation, Quarantined, RowError
from longdata.sources.partitions import Partition, iter_partition_rows
from longdata.sources.readers import iter_rows
from longdata.sources.schemas import PARSERS

Record = Conversation | Quarantined
SAMPLE_PREFIX = "builtin:sample/"


def schema_of(source: FileSource) -> str:
    if isinstance(source, GenericSource):
        return source.format
    return "alpaca" if isinstance(source, LongAlpacaSource) else "messages"


def read_source(source, *, cache_dir: Path, count_tokens: Callable[[str], int],
                partition: Partition | None = None) -> Iterator[Record]:
    """All records of one recipe source in a deterministic order, or only those of one of its
    partitions (``longdata.sources.partitions``), with the positions the whole read gives them."""
    if isinstance(source, AntiHaystackSource):
        from longdata.sources import antihaystack

        yield from antihaystack.generate(
            count=source.count, min_tokens=source.length_range[0], max_tokens=source.length_range[1],
            depth_range=source.depth_range, needles=source.needles, tasks=source.tasks,
            zh_fraction=source.zh_fraction, seed=source.seed, count_tokens=count_tokens,
            indices=range(*partition.span) if partition else None)
        return
    if partition is None:
        items, first_position = iter_rows(resolve_path(source, cache_dir), source.split), 0
    else:
        items, first_position = iter_partition_rows(partition), partition.first_position
    parse = PARSERS[schema_of(source)]
    for position, item in enumerate(items, start=first_position):
        if isinstance(item, Quarantined):
            yield item
            continue
        location, row = item
        try:
            messages = parse(row)
        except RowError as exc:
            yield Quarantined(location, str(exc), _preview(row))
            continue
        yield Conversation(messages, location, position=position)


def resolve_path(source: FileSource, cache_dir: Path) -> str:
    """The path to read; ``builtin:sample/<schema>`` is generated once into the cache."""
    if not source.path.startswith(SAMPLE_PREFIX):
        return source.path
    from longdata.sources.samples import SAMPLE_SCHEMAS

    schema = source.path.removeprefix(SAMPLE_PREFIX)
    if schema not in SAMPLE_SCHEMAS:
        raise FileNotFoundError(f"{source.path}: unknown sample schema; "
                                f"available: {', '.join(sorted(SAMPLE_SCHEMAS))}")
    writer, suffix = SAMPLE_SCHEMAS[schema]
    spec = source.sample
    target = cache_dir / "samples" / (
        f"{schema}-n{spec.rows}-c{spec.min_chars}-{spec.max_chars}-zh{spec.zh_fraction}-s{spec.seed}{suffix}")
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        # Concurrent builds sharing a cache may race to make the same file: each writes its own.
        partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
        writer(partial, spec.rows, seed=spec.seed, min_chars=spec.min_chars,
               max_chars=spec.max_chars, zh_fraction=spec.zh_fraction)
        partial.replace(target)
    return str(target)


def _preview(row: object, limit: int = 2000) -> str:
    import json

    try:
        text = json.dumps(row, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        text = repr(row)
    return text[:limit]
