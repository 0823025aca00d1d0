"""Train on a longdata build with Hugging Face `transformers.Trainer` (or TRL) instead of ours.

Two pieces:

- `BuildRows`: a `torch.utils.data.IterableDataset` over every packed row of one split of a
  build (each stream in turn, rows in order; shuffled per epoch with a seed if asked). Each item
  is the row as stored (`input_ids`, `loss_mask`, `seq_lens`, `source_ids`, ...), see
  docs/ROW_SCHEMA.md. DataLoader workers each take every n-th row; across ranks, the Trainer's
  accelerate splits the batches (every rank reads the same rows).
- `PackedCollator`: turns a list of rows into one *padding-free* batch in the format
  transformers' packing paths read (the one `DataCollatorWithFlattening` produces): all rows
  concatenated into a single sequence of shape [1, N] with

  - `input_ids` [1, N] int64;
  - `labels` [1, N] int64: the token where its `loss_mask` is 1, else -100, and -100 at the
    first token of every sample (it would otherwise be predicted from the previous sample);
  - `position_ids` [1, N] int64, restarting at 0 at every sample;
  - `cu_seq_lens_q` / `cu_seq_lens_k` [S + 1] int32: cumulative sample boundaries, and
    `max_length_q` / `max_length_k` (int): the longest sample, which flash-attention's varlen
    kernel takes directly.

Which `attn_implementation` keeps the samples apart (transformers 4.57, measured in
tests/test_hf_trainer.py):

- `flash_attention_2` (GPU, flash-attn installed): runs the varlen kernel on `cu_seq_lens_*`.
  The fastest; use it on a GPU.
- `sdpa` and `eager`: transformers rebuilds the sample boundaries from `position_ids` (a new
  sample wherever a position does not follow its predecessor) and masks across them, but only
  when the model has no KV cache in the forward pass: with `config.use_cache=True` (Llama's
  default, even in training) the boundaries are ignored and samples attend to each other.
  `prepare_for_packed_batches(model)` turns the cache off. Both build a dense N x N mask, so
  they cost memory quadratic in the batch's total tokens: fine on a CPU or for short rows.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from longdata.format import Manifest
from longdata.trainer.collation import collate

EXACT_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3", "sdpa", "eager")


class BuildRows(torch.utils.data.IterableDataset):
    """Every row of `split` of the build at `build_dir`, once per pass.

    `shuffle=True` visits the rows in a random order, a new one each pass (`set_epoch`, which
    transformers' Trainer calls every epoch); `seed` fixes the orders.
    """

    def __init__(
        self, build_dir: str | Path, split: str = "train", *, shuffle: bool = False, seed: int = 0
    ) -> None:
        from longdata.trainer.validation_loss import iter_rows, split_rows

        super().__init__()
        self.manifest = Manifest.read(build_dir)
        self.split = split
        self.rows = split_rows(self.manifest, split)  # raises KeyError for an unknown split
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self._iter_rows = iter_rows

    def __len__(self) -> int:
        return self.rows

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        info = torch.utils.data.get_worker_info()
        index, count = (info.id, info.num_workers) if info is not None else (0, 1)
        if not self.shuffle:
            for position, (_, row) in enumerate(self._iter_rows(self.manifest, self.split)):
                if position % count == index:
                    yield row
            return
        # A shuffled pass needs random access; the rows of a CPU-sized split fit in memory, and
        # a large build is better served by the shard reader (trainer.data.make_dataset).
        rows = [row for _, row in self._iter_rows(self.manifest, self.split)]
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(rows))
        for position in order[index::count]:
            yield rows[position]


class PackedCollator:
    """Rows -> one padding-free [1, N] batch (see the module docstring for the keys)."""

    def __call__(self, rows: Sequence[Mapping[str, np.ndarray]]) -> dict[str, Any]:
        return packed_batch(rows)


def packed_batch(rows: Sequence[Mapping[str, np.ndarray]]) -> dict[str, Any]:
    """The rows concatenated into one sequence with per-sample positions and boundaries.

    Labels and positions come from `trainer.collation.collate` (the bundled trainer's own
    rules), with its right-padding dropped.
    """
    batch = collate(rows)
    real = batch["sample_ids"] >= 0  # [B, T]; row-major selection keeps rows in order
    seq_lens = [int(n) for row in rows for n in row["seq_lens"]]
    cu_seq_lens = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
    cu_seq_lens[1:] = torch.cumsum(torch.tensor(seq_lens), dim=0)
    longest = max(seq_lens)
    return {
        "input_ids": batch["input_ids"][real][None],
        "labels": batch["labels"][real][None],
        "position_ids": batch["position_ids"][real][None],
        "cu_seq_lens_q": cu_seq_lens,
        "cu_seq_lens_k": cu_seq_lens,
        "max_length_q": longest,
        "max_length_k": longest,
    }


def prepare_for_packed_batches(model: Any) -> Any:
    """Make a stock transformers model keep `packed_batch`'s samples apart; returns it.

    Turns the KV cache off (with a cache, sdpa and eager ignore the sample boundaries in
    `position_ids`) and refuses an attention implementation not known to honour them.
    """
    implementation = getattr(model.config, "_attn_implementation", None)
    if implementation not in EXACT_IMPLEMENTATIONS:
        raise ValueError(
            f"attn_implementation {implementation!r} is not known to keep packed samples apart; "
            f"use one of {', '.join(EXACT_IMPLEMENTATIONS)}"
        )
    model.config.use_cache = False
    return model
