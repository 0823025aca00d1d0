"""The sample index: where every sample of a split went, as ``<split>/samples.parquet``.

One line per packed piece (stream, row, slot inside the row, token span of its sample), plus one
line per sample that was not packed, with the reason. It is what the data card is computed from,
what ``longdata inspect --sample-id`` looks up, and what ``longdata verify`` checks the rows
against. A sample's id is ``<source name>:<position in the source>``, stable across rebuilds and
mixes; a sample repeated by a weight above 1 appears once per repeat.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from longdata.format import BuildFormatError, inside
from longdata.stages.shards import piece_mask

INDEX_FILE = "samples.parquet"
NOT_PACKED = -1  # ``row`` and ``slot`` of a sample that is in no row

# What happened to a sample (``status``): kept whole, or cut to fit, or left out and why.
STATUSES = ("whole", "truncated", "split", "middle_cut", "dropped", "empty", "no_target_after_cut")

SCHEMA = pa.schema(
    [
        ("sample", pa.int64()),  # the sample's number in the split's mixed order; repeats differ
        ("sample_id", pa.string()),
        ("source", pa.string()),
        ("source_id", pa.uint16()),
        ("position", pa.int64()),
        ("lang", pa.string()),
        ("sample_tokens", pa.int64()),
        ("status", pa.string()),
        ("stream", pa.string()),
        ("row", pa.int64()),
        ("slot", pa.int32()),
        ("start", pa.int64()),
        ("tokens", pa.int64()),
        ("target_tokens", pa.int64()),
        # A middle cut (truncate_middle): the piece leaves out gap_tokens tokens from gap_start.
        ("gap_start", pa.int64()),
        ("gap_tokens", pa.int64()),
    ]
)


def sample_index(split, caches: Sequence, source_names: Sequence[str]) -> pa.Table:
    """The index of a planned split (a ``pipeline.SplitPlan``); rows are numbered per stream in
    the order ``write_split`` writes them."""
    samples, pieces = split.samples, split.pieces
    n_pieces = len(pieces)
    stream_of = np.empty(n_pieces, dtype=object)
    row_of = np.empty(n_pieces, dtype=np.int64)
    slot_of = np.empty(n_pieces, dtype=np.int32)
    for stream_name, rows in split.bucket_rows():
        for stream_row, row in enumerate(rows.tolist()):
            items = split.plan[row]
            stream_of[items] = stream_name
            row_of[items] = stream_row
            slot_of[items] = np.arange(len(items), dtype=np.int32)

    source = samples.source[pieces.sample]
    index = samples.index[pieces.sample]
    sample_tokens = samples.length[pieces.sample]
    target = gather_column(caches, "target_tokens", source, index).astype(np.int64)
    cut = np.flatnonzero((pieces.start > 0) | (pieces.length < sample_tokens))
    for p in cut.tolist():  # only cut pieces need their mask read; whole ones use the cached count
        target[p] = int(piece_mask(pieces, p, samples, caches).sum())
    pieces_per_sample = np.bincount(pieces.sample, minlength=len(samples))
    cut_status = "split" if split.overlength.policy == "split" else "truncated"
    status = np.where(
        pieces.gap_length > 0,
        "middle_cut",
        np.where(pieces.length < sample_tokens, cut_status, "whole"),
    ).astype(object)

    missing = np.flatnonzero(pieces_per_sample == 0)
    dropped_by_policy = (samples.length[missing] > split.max_len) & (
        split.overlength.policy == "drop"
    )
    missing_status = np.where(
        samples.length[missing] == 0,
        "empty",
        np.where(dropped_by_policy, "dropped", "no_target_after_cut"),
    ).astype(object)
    all_samples = np.concatenate([pieces.sample, missing])
    all_source = samples.source[all_samples]
    all_index = samples.index[all_samples]
    position = gather_column(caches, "position", all_source, all_index).astype(np.int64)
    names = np.asarray(source_names, dtype=object)
    empty_stream = np.full(len(missing), None, dtype=object)
    columns = {
        "sample": all_samples,
        "sample_id": [f"{names[s]}:{p}" for s, p in zip(all_source.tolist(), position.tolist())],
        "source": names[all_source],
        "source_id": all_source.astype(np.uint16),
        "position": position,
        "lang": gather_column(caches, "lang", all_source, all_index),
        "sample_tokens": samples.length[all_samples],
        "status": np.concatenate([status, missing_status]),
        "stream": np.concatenate([stream_of, empty_stream]),
        "row": np.concatenate([row_of, np.full(len(missing), NOT_PACKED)]),
        "slot": np.concatenate([slot_of, np.full(len(missing), NOT_PACKED, dtype=np.int32)]),
        "start": np.concatenate([pieces.start, np.zeros(len(missing), dtype=np.int64)]),
        "tokens": np.concatenate([pieces.length, np.zeros(len(missing), dtype=np.int64)]),
        "target_tokens": np.concatenate([target, np.zeros(len(missing), dtype=np.int64)]),
        "gap_start": np.concatenate([pieces.gap_start, np.zeros(len(missing), dtype=np.int64)]),
        "gap_tokens": np.concatenate([pieces.gap_length, np.zeros(len(missing), dtype=np.int64)]),
    }
    return pa.table(
        {name: pa.array(columns[name], type=SCHEMA.field(name).type) for name in SCHEMA.names}
    )


def gather_column(
    caches: Sequence, column: str, source: np.ndarray, index: np.ndarray
) -> np.ndarray:
    """``caches[source[i]].<column>[index[i]]`` for every i, one numpy gather per source."""
    first = getattr(caches[0], column)
    out = np.empty(len(source), dtype=first.dtype)
    for s, cache in enumerate(caches):
        chosen = source == s
        out[chosen] = getattr(cache, column)[index[chosen]]
    return out


def write_sample_index(
    split, caches: Sequence, source_names: Sequence[str], out_root: Path
) -> Path:
    path = inside(out_root, f"{split.name}/{INDEX_FILE}")
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(sample_index(split, caches, source_names), path, compression="zstd")
    return path


def read_sample_index(
    build_dir: Path, split_name: str, columns: Sequence[str] | None = None
) -> pa.Table:
    """The split's sample index; BuildFormatError (one line) when the file is damaged."""
    path = inside(build_dir, f"{split_name}/{INDEX_FILE}")
    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise BuildFormatError(f"{path}: not a readable sample index ({reason})") from None
