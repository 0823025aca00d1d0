"""The row schema (docs/ROW_SCHEMA.md) in executable form.

``COLUMNS`` is what every MDS shard of a build holds; ``check_row`` says why a row breaks the
contract (or None). The builder's tests and ``longdata verify`` check whole rows with it; the
trainer's ``collate`` checks the structure it relies on (``row_structure_problem``) on every batch.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

COLUMNS = {
    "input_ids": "ndarray:uint32",
    "loss_mask": "ndarray:uint8",
    "seq_lens": "ndarray:uint32",
    "source_ids": "ndarray:uint16",
}
DTYPES = {name: np.dtype(encoding.split(":")[1]) for name, encoding in COLUMNS.items()}
# Every shard records these hashes in its index.json; readers check them before use.
SHARD_HASHES = ["xxh64"]
# The label of a token that is not a target (PyTorch's cross-entropy ignore_index).
IGNORE_INDEX = -100


def sample_starts(seq_lens: np.ndarray) -> np.ndarray:
    """Where each sample of a row starts (int64 offsets into the row)."""
    lengths = np.asarray(seq_lens, dtype=np.int64)
    return np.concatenate(([0], np.cumsum(lengths[:-1]))).astype(np.int64)


def row_labels(row: Mapping[str, np.ndarray]) -> np.ndarray:
    """A row's int64 labels: the token where its loss_mask is 1, else ``IGNORE_INDEX``, and
    ``IGNORE_INDEX`` at every sample's first token (nothing of its sample precedes it to predict
    it from; packed, the token before it is the previous sample's last)."""
    input_ids = np.asarray(row["input_ids"], dtype=np.int64)
    labels = np.where(np.asarray(row["loss_mask"], dtype=bool), input_ids, IGNORE_INDEX)
    labels[sample_starts(row["seq_lens"])] = IGNORE_INDEX
    return labels


def row_structure_problem(row: Mapping[str, np.ndarray]) -> str | None:
    """Why the row's columns do not describe one packed row (lengths that disagree, empty or
    zero-length samples, one source id per sample), or None."""
    missing = [column for column in COLUMNS if column not in row]
    if missing:
        return f"missing column {', '.join(missing)}"
    ids, mask, seq_lens, sources = (np.asarray(row[c]) for c in COLUMNS)
    total = int(seq_lens.sum(dtype=np.int64))
    if len(seq_lens) == 0 or (seq_lens < 1).any():
        return "seq_lens must be non-empty with every length >= 1"
    if not len(ids) == len(mask) == total:
        return (
            f"row is inconsistent: len(input_ids)={len(ids)}, len(loss_mask)={len(mask)}, "
            f"sum(seq_lens)={total} differ"
        )
    if len(sources) != len(seq_lens):
        return f"{len(sources)} source_ids for {len(seq_lens)} samples"
    return None


def check_row(row: Mapping[str, np.ndarray], max_seq_len: int, n_sources: int) -> str | None:
    """Why ``row`` breaks the row contract, or None when it honours it."""
    for column, dtype in DTYPES.items():
        if column in row and row[column].dtype != dtype:
            return f"{column} has dtype {row[column].dtype}, expected {dtype}"
    problem = row_structure_problem(row)
    if problem:
        return problem
    ids, mask, seq_lens, sources = (row[c] for c in COLUMNS)
    if len(ids) > max_seq_len:
        return f"row has {len(ids)} tokens, more than max_seq_len {max_seq_len}"
    if (sources >= n_sources).any():
        return f"source id {int(sources.max())} out of range ({n_sources} sources)"
    if mask.max(initial=0) > 1:
        return "loss_mask holds values other than 0 and 1"
    starts = np.concatenate(([0], np.cumsum(seq_lens[:-1], dtype=np.int64)))
    if mask[starts].any():
        return "a sample's first token has loss_mask 1"
    return None
