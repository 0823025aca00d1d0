"""Turn packed MDS rows into one batch of tensors that keeps every sample to itself.

(The module is not called `collate`: importing a submodule binds its name on the package, and
`trainer.collate` must stay the function.)

A row (see docs/ROW_SCHEMA.md) is several whole samples concatenated. `collate` right-pads the
rows of a batch to a common length and describes where every sample starts and ends, in the
forms the attention backends in `trainer.attention` want:

- `position_ids` restart at 0 for each sample, so rotary embeddings see every sample as if it
  were alone (with `position_span`, PoSE: a sample's positions skip once, drawn from the
  sample's own tokens, so it gets the same positions in any row and alone);
- `cu_seqlens` / `max_seqlen` are the varlen (flash-attn style) view: cumulative segment
  boundaries over the batch flattened to one B*T sequence;
- `document_ids` are the mask view: one integer per token, equal only within one segment of one
  row. The dense block-diagonal mask (`sdpa_mask`) and the flex block mask are built from it
  inside the backend, so collate never materialises a B x T x T tensor.

Padding at the end of a row is its own segment: it attends only to itself, so it cannot disturb
real tokens and never produces an all-masked (NaN) softmax row.

Labels follow the Hugging Face convention (the model shifts them: the label at position t is
predicted from position t-1). A sample's first token would therefore be predicted from the
previous sample's last token, so its label is always -100, whatever its loss_mask says.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from longdata.format import IGNORE_INDEX, row_labels, row_structure_problem

PADDING_SOURCE = -1

# The keys of a batch that are bookkeeping for the loss, not inputs the model needs. They are
# harmless to pass to `model.forward` (transformers forwards unknown kwargs down to the attention
# function, which ignores them), so `model(**batch)` works.
LOSS_METADATA_KEYS = ("source_ids", "sample_ids", "sample_target_counts", "sample_source_ids")


def skipped_positions(tokens: np.ndarray, span: int, seed: int) -> torch.Tensor:
    """PoSE (positional skip-wise training, Zhu et al., ICLR 2024) for one sample of L < `span`
    tokens: positions 0..c-1, then c+s..L+s-1, with the split c in [1, L) and the skip s in
    [0, span - L] drawn uniformly. The sample's tokens then meet relative distances up to
    span - 1 while it stays L tokens long: a model trained on short rows learns the rotary
    angles of longer contexts. The draw is keyed by the sample's own tokens and `seed`, never by
    its row or offset, so packed equals alone under it too. A sample of `span` tokens or more
    keeps 0..L-1."""
    length = len(tokens)
    if length >= span or length < 2:
        return torch.arange(length)
    digest = hashlib.blake2b(np.asarray(tokens, dtype=np.int64).tobytes(), digest_size=16)
    rng = random.Random(f"{seed}:{digest.hexdigest()}")
    split, skip = rng.randrange(1, length), rng.randint(0, span - length)
    positions = torch.arange(length)
    positions[split:] += skip
    return positions


def collate(
    rows: Sequence[Mapping[str, np.ndarray]],
    pad_to_multiple_of: int | None = None,
    position_span: int | None = None,
    position_seed: int = 0,
) -> dict[str, torch.Tensor | int]:
    """Batch packed rows into tensors for a causal LM that must not attend across samples.

    Returns a dict with, for a batch of B rows padded to length T:

    - `input_ids` [B, T] int64, right-padded with 0 (padding is never attended to or learned);
    - `labels` [B, T] int64: the token itself where its loss_mask is 1, else -100; also -100 at
      every sample's first token and on padding;
    - `position_ids` [B, T] int64, restarting at 0 for every sample and for the padding segment
      (with `position_span`, each sample's are `skipped_positions(its tokens, position_span,
      position_seed)`);
    - `cu_seqlens` [S + 1] int32: segment boundaries over the flattened B*T tokens (segments are
      the samples of every row, then that row's padding if any);
    - `max_seqlen` int: the longest segment;
    - `document_ids` [B, T] int32: segment number of every token, unique within the batch;
    - `source_ids` [B, T] int64: every token's source index, -1 on padding;
    - `sample_ids` [B, T] int64: every token's sample number within the batch, -1 on padding;
    - `sample_target_counts` [N] int64: labelled tokens of each of the N samples (for the
      sequence-mean loss);
    - `sample_source_ids` [N] int64: the source of each sample.
    """
    if not rows:
        raise ValueError("collate needs at least one row")
    row_lengths = [len(row["input_ids"]) for row in rows]
    padded_length = max(row_lengths)
    if pad_to_multiple_of:
        padded_length = -(-padded_length // pad_to_multiple_of) * pad_to_multiple_of
    batch_size = len(rows)

    input_ids = torch.zeros(batch_size, padded_length, dtype=torch.int64)
    labels = torch.full((batch_size, padded_length), IGNORE_INDEX, dtype=torch.int64)
    position_ids = torch.zeros(batch_size, padded_length, dtype=torch.int64)
    document_ids = torch.zeros(batch_size, padded_length, dtype=torch.int32)
    source_ids = torch.full((batch_size, padded_length), PADDING_SOURCE, dtype=torch.int64)
    sample_ids = torch.full((batch_size, padded_length), -1, dtype=torch.int64)
    segment_lengths: list[int] = []
    sample_source_ids: list[int] = []

    for row_index, row in enumerate(rows):
        seq_lens = [int(length) for length in row["seq_lens"]]
        row_length = row_lengths[row_index]
        # A silent mismatch would leak attention across samples: fail loudly instead.
        problem = row_structure_problem(row)
        if problem:
            raise ValueError(problem)
        # MDS hands back unsigned arrays; nn.Embedding and the loss want int64.
        input_ids[row_index, :row_length] = torch.from_numpy(
            np.asarray(row["input_ids"], dtype=np.int64)
        )
        labels[row_index, :row_length] = torch.from_numpy(row_labels(row))

        start = 0
        for sample_length, source in zip(seq_lens, row["source_ids"], strict=True):
            end = start + sample_length
            if position_span:
                tokens = row["input_ids"][start:end]
                positions = skipped_positions(tokens, position_span, position_seed)
                position_ids[row_index, start:end] = positions
            else:
                position_ids[row_index, start:end] = torch.arange(sample_length)
            document_ids[row_index, start:end] = len(segment_lengths)
            source_ids[row_index, start:end] = int(source)
            sample_ids[row_index, start:end] = len(sample_source_ids)
            segment_lengths.append(sample_length)
            sample_source_ids.append(int(source))
            start = end

        padding = padded_length - row_length
        if padding:
            position_ids[row_index, row_length:] = torch.arange(padding)
            document_ids[row_index, row_length:] = len(segment_lengths)
            segment_lengths.append(padding)

    cu_seqlens = torch.zeros(len(segment_lengths) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(torch.tensor(segment_lengths), dim=0)
    sample_target_counts = torch.zeros(len(sample_source_ids), dtype=torch.int64)
    labelled = labels != IGNORE_INDEX
    sample_target_counts.index_add_(
        0, sample_ids[labelled], torch.ones(int(labelled.sum()), dtype=torch.int64)
    )
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "cu_seqlens": cu_seqlens,
        "max_seqlen": max(segment_lengths),
        "document_ids": document_ids,
        "source_ids": source_ids,
        "sample_ids": sample_ids,
        "sample_target_counts": sample_target_counts,
        "sample_source_ids": torch.tensor(sample_source_ids, dtype=torch.int64),
    }
