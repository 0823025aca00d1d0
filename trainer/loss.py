"""Next-token losses over packed batches: token mean and LongAlign-style sequence mean.

A training step may span several micro-batches (gradient accumulation). Both losses are
normalised by totals over the whole step, so accumulating micro-batch losses gives exactly the
loss of the step's rows processed at once:

- `token_mean`: sum of target-token losses / number of target tokens in the step. Long samples
  dominate, since they hold most target tokens.
- `sequence_mean`: each sample's mean target-token loss, averaged over the step's samples that
  have targets, so every sample counts equally whatever its length (LongAlign's loss weighting).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from longdata.format import IGNORE_INDEX
from longdata.trainer.config import LOSS_MODES
from longdata.trainer.memory import tiled_target_losses


@dataclass(frozen=True)
class TokenLosses:
    """Per-target-token losses of one micro-batch, with each target's sample and source."""

    values: torch.Tensor  # [N] float32
    sample_ids: torch.Tensor  # [N] index into the batch's samples
    source_ids: torch.Tensor  # [N] source index from the manifest


def next_token_targets(
    batch: Mapping[str, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every position, the label, sample and source of the token it predicts (the next one).

    The last position predicts nothing (label -100). A sequence-parallel shard carries these
    precomputed as `next_labels` / `next_sample_ids` / `next_source_ids`, because its last
    position predicts a token that lives in the next shard (see `trainer.distributed`).
    """
    if "next_labels" in batch:
        return batch["next_labels"], batch["next_sample_ids"], batch["next_source_ids"]

    def shifted(values: torch.Tensor, fill: int) -> torch.Tensor:
        return torch.cat([values[:, 1:], values.new_full((values.shape[0], 1), fill)], dim=1)

    return (
        shifted(batch["labels"], IGNORE_INDEX),
        shifted(batch["sample_ids"], -1),
        shifted(batch["source_ids"], -1),
    )


def token_losses(
    outputs: torch.Tensor,
    batch: Mapping[str, torch.Tensor],
    output_layer: torch.nn.Module | None = None,
    loss_chunk_tokens: int = 0,
) -> TokenLosses:
    """Cross-entropy of every target token, predicted from the position before it.

    `outputs` are logits [B, T, V], or hidden states [B, T, H] when `output_layer` is given: then
    only the positions that predict a target go through it. In long-context SFT the targets are a
    few percent of the tokens, and full logits would dominate memory (2 GiB in fp32 for one
    32K-token row at a 16K vocabulary) and the output layer's FLOPs. With `loss_chunk_tokens`,
    the targets go through the output layer that many at a time, recomputed in backward
    (`trainer.memory.tiled_target_losses`): for rows that are mostly targets.
    """
    labels, sample_ids, source_ids = next_token_targets(batch)
    is_target = labels != IGNORE_INDEX
    selected = outputs[is_target]
    if output_layer is None:
        values = F.cross_entropy(selected.float(), labels[is_target], reduction="none")
    else:
        values = tiled_target_losses(selected, labels[is_target], output_layer, loss_chunk_tokens)
    return TokenLosses(
        values=values, sample_ids=sample_ids[is_target], source_ids=source_ids[is_target]
    )


def model_token_losses(
    model: torch.nn.Module,
    batch: Mapping[str, torch.Tensor],
    loss_chunk_tokens: int = 0,
    inputs: Mapping[str, Any] | None = None,
) -> TokenLosses:
    """Run a causal LM's decoder on a collated batch and score only the target positions.

    `labels` stay out of the forward call: given labels, a transformers model computes its own
    loss over full logits, which this path exists to avoid. `inputs` replace what the decoder is
    fed (default: the batch without labels); the targets still come from `batch`.
    """
    if inputs is None:
        inputs = {key: value for key, value in batch.items() if key != "labels"}
    hidden = model.get_decoder()(**inputs).last_hidden_state
    return token_losses(hidden, batch, model.get_output_embeddings(), loss_chunk_tokens)


class TargetScorer(torch.nn.Module):
    """`model_token_losses` as a module's forward.

    DDP and FSDP do their work in hooks around the forward of the module they wrap, so the
    training step calls this wrapper rather than the decoder directly. It returns a plain tuple
    (values, sample_ids, source_ids) because those wrappers walk a forward's output.
    """

    def __init__(self, model: torch.nn.Module, loss_chunk_tokens: int = 0) -> None:
        super().__init__()
        self.model = model
        self.loss_chunk_tokens = loss_chunk_tokens

    def forward(
        self, batch: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        losses = model_token_losses(self.model, batch, self.loss_chunk_tokens)
        return losses.values, losses.sample_ids, losses.source_ids


def step_denominator(mode: str, micro_batches: list[Mapping[str, torch.Tensor]]) -> int:
    """What the step's loss is divided by: its target tokens, or its samples with targets."""
    if mode == "token_mean":
        return sum(int(b["sample_target_counts"].sum()) for b in micro_batches)
    if mode == "sequence_mean":
        return sum(int((b["sample_target_counts"] > 0).sum()) for b in micro_batches)
    raise ValueError(f"unknown loss mode {mode!r}; choose from {LOSS_MODES}")


def micro_batch_loss(
    losses: TokenLosses, batch: Mapping[str, torch.Tensor], mode: str, denominator: int
) -> torch.Tensor:
    """This micro-batch's share of the step loss (the shares sum to the step loss)."""
    denominator = max(denominator, 1)
    if mode == "token_mean":
        return losses.values.sum() / denominator
    if mode == "sequence_mean":
        counts = batch["sample_target_counts"]
        per_sample = torch.zeros(len(counts), dtype=losses.values.dtype, device=counts.device)
        per_sample = per_sample.index_add(0, losses.sample_ids, losses.values)
        return (per_sample / counts.clamp(min=1)).sum() / denominator
    raise ValueError(f"unknown loss mode {mode!r}; choose from {LOSS_MODES}")
