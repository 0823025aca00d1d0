"""Rows -> MDS streams, in the row schema of ``longdata.format.rows`` (docs/ROW_SCHEMA.md)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from longdata.format.mds import MDSWriter
from longdata.format.rows import COLUMNS, DTYPES, SHARD_HASHES, sample_starts
from longdata.stages.mix import SampleList
from longdata.stages.packing import Pieces
from longdata.stages.tokenization import TokenCache


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
        for item, source, index in zip(
            items.tolist(), sources.tolist(), samples.index[sample_of].tolist()
        ):
            for start, length in pieces.ranges(item):  # two ranges where the middle was cut out
                range_ids, range_mask = self.caches[source].tokens(index, start, length)
                ids.append(range_ids)
                masks.append(range_mask)
        seq_lens = pieces.length[items].astype(DTYPES["seq_lens"])
        loss_mask = np.concatenate(masks)
        # Every piece starts a new sequence: its first token is never a target (the first piece
        # of a sample already has 0 there; later pieces of a split sample get it here).
        loss_mask[sample_starts(seq_lens)] = 0
        return {
            "input_ids": np.concatenate(ids),
            "loss_mask": loss_mask,
            "seq_lens": seq_lens,
            "source_ids": sources.astype(DTYPES["source_ids"]),
        }


def piece_mask(
    pieces: Pieces, piece: int, samples: SampleList, caches: Sequence[TokenCache]
) -> np.ndarray:
    """The cached loss mask of one piece's tokens (as its sample had them, before any row rule)."""
    sample = pieces.sample[piece]
    cache, index = caches[samples.source[sample]], int(samples.index[sample])
    return np.concatenate(
        [cache.tokens(index, start, length)[1] for start, length in pieces.ranges(piece)]
    )


def write_stream(
    rows: Iterable[dict[str, np.ndarray]],
    out_dir: Path,
    *,
    name: str,
    rel_path: str,
    compression: str | None,
    size_limit: int,
) -> StreamStats:
    stats = StreamStats(name=name, path=rel_path)
    with MDSWriter(
        out=str(out_dir),
        columns=COLUMNS,
        compression=compression,
        hashes=SHARD_HASHES,
        size_limit=size_limit,
    ) as writer:
        for row in rows:
            writer.write(row)
            stats.rows += 1
            stats.samples += len(row["seq_lens"])
            stats.tokens += len(row["input_ids"])
            stats.target_tokens += int(row["loss_mask"].sum())
    return stats
