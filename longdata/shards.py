"""Rows -> MDS streams, and the checks that a written build honours the row contract.

The row schema (docs/ROW_SCHEMA.md) is the only thing the trainer relies on; ``check_row`` is
its executable form, shared by the writer's tests and ``longdata verify``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from longdata.mix import SampleList
from longdata.packing import Pieces
from longdata.tokenize import TokenCache

COLUMNS = {
    "input_ids": "ndarray:uint32",
    "loss_mask": "ndarray:uint8",
    "seq_lens": "ndarray:uint32",
    "source_ids": "ndarray:uint16",
}
SHARD_HASHES = ["xxh64"]


@dataclass
class StreamStats:
    name: str
    path: str
    rows: int = 0
    samples: int = 0
    tokens: int = 0
    target_tokens: int = 0
    proportion: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


class RowAssembler:
    """Gathers the tokens of planned rows from the token caches (zero-copy until the concat)."""

    def __init__(self, pieces: Pieces, samples: SampleList, caches: Sequence[TokenCache]):
        self.pieces, self.samples, self.caches = pieces, samples, caches

    def row(self, items: np.ndarray) -> dict[str, np.ndarray]:
        ids, masks = [], []
        pieces, samples = self.pieces, self.samples
        sample_of = pieces.sample[items]
        sources = samples.source[sample_of]
        for item, source, index in zip(items.tolist(), sources.tolist(), samples.index[sample_of].tolist()):
            for start, length in pieces.ranges(item):  # two ranges where the middle was cut out
                range_ids, range_mask = self.caches[source].tokens(index, start, length)
                ids.append(range_ids)
                masks.append(range_mask)
        seq_lens = pieces.length[items].astype(np.uint32)
        loss_mask = np.concatenate(masks)
        # Every piece starts a new sequence: its first token is never a target (the first piece
        # of a sample already has 0 there; later pieces of a split sample get it here).
        loss_mask[np.concatenate(([0], np.cumsum(seq_lens[:-1], dtype=np.int64)))] = 0
        return {
            "input_ids": np.concatenate(ids),
            "loss_mask": loss_mask,
            "seq_lens": seq_lens,
            "source_ids": sources.astype(np.uint16),
        }


def piece_mask(pieces: Pieces, piece: int, samples: SampleList, caches: Sequence[TokenCache]) -> np.ndarray:
    """The cached loss mask of one piece's tokens (as its sample had them, before any row rule)."""
    sample = pieces.sample[piece]
    cache, index = caches[samples.source[sample]], int(samples.index[sample])
    return np.concatenate([cache.tokens(index, start, length)[1] for start, length in pieces.ranges(piece)])


def write_stream(rows: Iterable[dict[str, np.ndarray]], out_dir: Path, *, name: str, rel_path: str,
                 compression: str | None, size_limit: int) -> StreamStats:
    from streaming import MDSWriter

    stats = StreamStats(name=name, path=rel_path)
    with MDSWriter(out=str(out_dir), columns=COLUMNS, compression=compression,
                   hashes=SHARD_HASHES, size_limit=size_limit, progress_bar=False) as writer:
        for row in rows:
            writer.write(row)
            stats.rows += 1
            stats.samples += len(row["seq_lens"])
            stats.tokens += len(row["input_ids"])
            stats.target_tokens += int(row["loss_mask"].sum())
    return stats


def check_row(row: dict[str, np.ndarray], max_seq_len: int, n_sources: int) -> str | None:
    """Why ``row`` breaks the row contract, or None when it honours it."""
    dtypes = {"input_ids": np.uint32, "loss_mask": np.uint8, "seq_lens": np.uint32, "source_ids": np.uint16}
    for column, dtype in dtypes.items():
        if column not in row:
            return f"missing column {column}"
        if row[column].dtype != dtype:
            return f"{column} has dtype {row[column].dtype}, expected {np.dtype(dtype)}"
    ids, mask, seq_lens, sources = (row[c] for c in dtypes)
    total = int(seq_lens.sum(dtype=np.int64))
    if len(seq_lens) == 0 or (seq_lens == 0).any():
        return "seq_lens must be non-empty with every length >= 1"
    if not len(ids) == len(mask) == total:
        return f"len(input_ids)={len(ids)}, len(loss_mask)={len(mask)}, sum(seq_lens)={total} differ"
    if total > max_seq_len:
        return f"row has {total} tokens, more than max_seq_len {max_seq_len}"
    if len(sources) != len(seq_lens):
        return f"{len(sources)} source_ids for {len(seq_lens)} samples"
    if (sources >= n_sources).any():
        return f"source id {int(sources.max())} out of range ({n_sources} sources)"
    if mask.max(initial=0) > 1:
        return "loss_mask holds values other than 0 and 1"
    starts = np.concatenate(([0], np.cumsum(seq_lens[:-1], dtype=np.int64)))
    if mask[starts].any():
        return "a sample's first token has loss_mask 1"
    return None
