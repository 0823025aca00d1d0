"""Source partitions: contiguous shares of one source's rows that read and tokenize on their own.

A source is cut where its format allows reading from the middle: JSONL files by byte range (the
bounds moved to line starts), Parquet files by row group, hub datasets by groups of their data
files (``IterableDataset.shard(contiguous=True)``), generated sources by item index, and a JSON
array (which must be parsed from its start) by ranges of element numbers. Each partition is
told the position of its first row in the whole source (and, in JSONL, its first line number),
so its samples carry the positions and locations an unpartitioned read gives them: in partition
order, the partitions' rows are exactly the source's rows.

Positions of later partitions depend on how many rows the earlier ones hold, which only reading
them tells for JSONL, JSON arrays and hub shards: ``count_rows`` reads a partition without
tokenizing it (the pipeline runs it as a task), then ``place`` assigns the positions.

A partition carries its file's label (its path inside the source directory, as
``readers.iter_source_files`` names it), so locations and the per-file row accounting are the
same however a source is cut. ``kind: text`` sources read as text files (``glob``) are not cut:
``plan_partitions`` returns None for them and they are read whole.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from longdata.recipe import AntiHaystackSource, TextSource
from longdata.sources.readers import (
    Row,
    file_layout,
    iter_hub_rows,
    iter_json_array,
    iter_jsonl,
    iter_parquet,
    local_files,
    open_hub_dataset,
)

READERS = ("jsonl", "json_array", "parquet", "hub", "generated")


@dataclass(frozen=True)
class Partition:
    """One contiguous share of a source.

    ``span`` is in the reader's own unit: bytes of a JSONL file, element numbers of a JSON
    array, row groups of a Parquet file, ``(group, groups)`` of a hub dataset's data files, item
    indices of a generated source (``(0, None)``: the whole file). ``rows`` is the number of
    items its reader yields, once known. ``label`` names its file in locations and per-file counts.
    """

    reader: str
    path: str
    span: tuple[int, int | None]
    split: str = "train"
    rows: int | None = None
    first_position: int = 0
    first_line: int = 1
    label: str = ""


def plan_partitions(source, path: str | None, wanted: int) -> list[Partition] | None:
    """About ``wanted`` partitions of ``source`` (``path``: its resolved path; None for a
    generated source), positions not yet assigned. Files too small to cut give fewer; a text
    source read as text files gives None (it is read whole)."""
    if isinstance(source, AntiHaystackSource):
        return [
            Partition("generated", "", (a, b), rows=b - a) for a, b in _ranges(source.count, wanted)
        ]
    if isinstance(source, TextSource) and source.glob is not None:
        return None
    files = local_files(path)
    if files is None:
        groups = min(wanted, open_hub_dataset(path, source.split).num_shards)
        return [
            Partition("hub", path, (i, groups), split=source.split, label=path)
            for i in range(groups)
        ]
    return [part for label, file in files for part in _file_partitions(file, label, wanted)]


def _file_partitions(file: Path, label: str, wanted: int) -> list[Partition]:
    layout = file_layout(file)
    if layout == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            metadata = pq.ParquetFile(file).metadata
        except (pa.ArrowException, OSError):  # the reader quarantines it; it is counted by reading
            return [Partition("parquet", str(file), (0, None), label=label)]
        sizes = [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
        return [
            Partition("parquet", str(file), (a, b), rows=sum(sizes[a:b]), label=label)
            for a, b in _ranges(len(sizes), wanted)
        ]
    if layout == "json_array":
        return [
            Partition("json_array", str(file), (0, None), label=label)
        ]  # cut by place() once counted
    bounds = _line_starts(file, wanted)
    return [Partition("jsonl", str(file), (a, b), label=label) for a, b in zip(bounds, bounds[1:])]


def _ranges(total: int, wanted: int) -> list[tuple[int, int]]:
    """``[0, total)`` as at most ``wanted`` contiguous non-empty ranges of near-equal size."""
    parts = max(1, min(wanted, total))
    return [(i * total // parts, (i + 1) * total // parts) for i in range(parts)]


def _line_starts(file: Path, wanted: int) -> list[int]:
    """0, the line starts nearest after each ``k * size / wanted``, and the size."""
    size = file.stat().st_size
    bounds = [0]
    with file.open("rb") as handle:
        for k in range(1, wanted):
            cut = k * size // wanted
            if cut <= bounds[-1]:
                continue  # the previous line reaches past this cut
            handle.seek(cut - 1)
            handle.readline()  # to the end of the line holding the byte before the cut
            bounds.append(handle.tell())
    return sorted({*bounds, size})


def count_rows(partition: Partition) -> tuple[int, int]:
    """(items its reader yields, lines it spans; 0 unless JSONL) of a partition, read with the
    same reader that tokenizing it uses, so the count cannot disagree with the read."""
    if partition.rows is not None:
        return partition.rows, 0
    rows = sum(1 for _ in iter_partition_rows(partition))
    lines = 0
    if partition.reader == "jsonl":
        start, stop = partition.span
        with open(partition.path, "rb") as handle:
            handle.seek(start)
            data = handle.read(stop - start)
        lines = data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)
    return rows, lines


def place(
    partitions: list[Partition], counts: list[tuple[int, int]], wanted: int
) -> list[Partition]:
    """The partitions with their row counts, first positions and first line numbers; each
    counted JSON array cut into about ``wanted`` ranges of element numbers."""
    placed, position, line, previous_file = [], 0, 1, None
    for partition, (rows, lines) in zip(partitions, counts):
        if partition.path != previous_file:
            line, previous_file = 1, partition.path  # line numbers are per file
        pieces = (
            [
                dataclasses.replace(partition, span=(a, b), rows=b - a)
                for a, b in _ranges(rows, wanted)
            ]
            if partition.reader == "json_array"
            else [dataclasses.replace(partition, rows=rows)]
        )
        for piece in pieces:
            placed.append(dataclasses.replace(piece, first_position=position, first_line=line))
            position += piece.rows
        line += lines
    return [p for p in placed if p.rows]


def iter_partition_rows(partition: Partition) -> Iterator[Row]:
    """The ``(location, row)`` items and ``Quarantined`` rows of one file or hub partition."""
    path, (start, stop) = Path(partition.path), partition.span
    label = partition.label
    if partition.reader == "jsonl":
        return iter_jsonl(path, label, (start, stop), partition.first_line)
    if partition.reader == "json_array":
        return itertools.islice(iter_json_array(path, label), start, stop)
    if partition.reader == "parquet":
        return iter_parquet(path, label, None if stop is None else range(start, stop))
    if partition.reader == "hub":
        return iter_hub_rows(
            partition.path, partition.split, (start, stop), partition.first_position
        )
    raise ValueError(f"a {partition.reader} partition has no rows to read")
