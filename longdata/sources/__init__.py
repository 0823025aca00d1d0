"""Sources: every recipe source kind becomes one stream of ``Conversation | Quarantined``.

``longalign`` rows use the messages schema and ``longalpaca`` rows the Alpaca schema; ``generic``
takes either (or ShareGPT) by its ``format``; ``antihaystack`` is generated, not read.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from longdata.recipe import AntiHaystackSource, FileSource, GenericSource, LongAlpacaSource
from longdata.records import Conversation, Quarantined, RowError
from longdata.sources.readers import iter_source_files
from longdata.sources.schemas import PARSERS

Record = Conversation | Quarantined
SAMPLE_PREFIX = "builtin:sample/"


def schema_of(source: FileSource) -> str:
    if isinstance(source, GenericSource):
        return source.format
    return "alpaca" if isinstance(source, LongAlpacaSource) else "messages"


def read_source(source, *, cache_dir: Path, count_tokens: Callable[[str], int],
                share: tuple[int, int] = (0, 1)) -> Iterator[Record]:
    """All records of one recipe source in a deterministic order, or with ``share=(i, n)`` the
    rows whose position is ``i`` modulo ``n`` (worker ``i`` of ``n`` in a partitioned build)."""
    worker, workers = share
    if isinstance(source, AntiHaystackSource):
        from longdata.sources import antihaystack

        yield from antihaystack.generate(
            count=source.count, min_tokens=source.length_range[0], max_tokens=source.length_range[1],
            depth_range=source.depth_range, needles=source.needles, tasks=source.tasks,
            zh_fraction=source.zh_fraction, seed=source.seed, count_tokens=count_tokens,
            indices=range(worker, source.count, workers))
        return
    parse = PARSERS[schema_of(source)]
    position = -1
    for file, rows in iter_source_files(resolve_path(source, cache_dir), source.split):
        for item in rows:
            position += 1
            if position % workers != worker:
                continue
            if isinstance(item, Quarantined):
                yield dataclasses.replace(item, file=file)
                continue
            location, row = item
            try:
                messages = parse(row)
            except RowError as exc:
                yield Quarantined(location, str(exc), _preview(row), file)
                continue
            except Exception as exc:  # one row must never stop the build: it is quarantined
                yield Quarantined(location, f"cannot normalise this row: {type(exc).__name__}: "
                                  f"{str(exc)[:500]}", _preview(row), file)
                continue
            yield Conversation(messages, location, position=position, file=file)


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
        # Workers of a partitioned build may race to make the same file: each writes its own.
        partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
        writer(partial, spec.rows, seed=spec.seed, min_chars=spec.min_chars,
               max_chars=spec.max_chars, zh_fraction=spec.zh_fraction)
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
