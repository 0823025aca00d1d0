"""The packing invariant: a packed sample behaves exactly as if it were alone.

For every sample of a packed batch, its logits must equal those of running the sample alone
through the same model with stock attention, and the gradients of the summed per-sample
losses must equal the gradients of the same losses computed sample by sample. Used by the tests
and by `longdata check-packing` on real rows.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel

from longdata.trainer.attention import (
    available_backends,
    implementation_name,
    shifted_sparse_inputs,
    unavailable_reason,
)
from longdata.trainer.collation import collate
from longdata.trainer.config import DEFAULT_LOSS_CHUNK_TOKENS
from longdata.trainer.loss import TokenLosses, model_token_losses
from longdata.trainer.model import set_attention
from longdata.trainer.step import micro_step


@dataclass(frozen=True)
class PackingError:
    """Largest absolute differences between packed and one-sample-at-a-time results."""

    logits: float
    grads: float | None  # None when the backward pass was not checked


# The reference runs every sample alone with transformers' stock sdpa and no mask: the plain
# causal kernel. (Stock eager attention would hold a [heads, L, L] score matrix per layer, 1 GiB
# per layer for one 8K-token sample, for no extra certainty.)
REFERENCE_ATTENTION = "sdpa"
ALONE_KEYS = ("input_ids", "labels", "sample_ids", "source_ids")


def _gradients(model: PreTrainedModel) -> list[torch.Tensor]:
    return [
        (p.grad if p.grad is not None else torch.zeros_like(p)).detach().clone()
        for p in model.parameters()
        if p.requires_grad
    ]


def _alone_batches(batch: Mapping[str, torch.Tensor | int]) -> Iterator[tuple[int, slice, dict]]:
    """Every sample of the batch as a batch of its own: (row, span in the row, batch)."""
    length = batch["input_ids"].shape[1]
    for start, end in itertools.pairwise(batch["cu_seqlens"].tolist()):
        row, offset = divmod(start, length)
        span = slice(offset, offset + end - start)
        if batch["sample_ids"][row, offset] < 0:
            continue  # a padding segment: not a sample
        alone = {key: batch[key][row : row + 1, span] for key in ALONE_KEYS}
        yield row, span, alone


@torch.no_grad()
def _max_logit_error(model: PreTrainedModel, packed: torch.Tensor, alone: torch.Tensor) -> float:
    """Largest |logit difference| between two hidden-state sequences [L, H], chunk by chunk."""
    output_layer = model.get_output_embeddings()
    return max(
        float((output_layer(p) - output_layer(a)).abs().max())
        for p, a in zip(
            packed.split(DEFAULT_LOSS_CHUNK_TOKENS),
            alone.split(DEFAULT_LOSS_CHUNK_TOKENS),
            strict=True,
        )
    )


def _reference(alone: Mapping[str, torch.Tensor], s2_group: float | None) -> tuple[str, dict]:
    """How one sample alone is run: stock attention (full), or, under shifted sparse, the
    per-group SDPA loop with the sample's own groups (stock attention knows no groups)."""
    if s2_group is None:
        return REFERENCE_ATTENTION, {"input_ids": alone["input_ids"], "use_cache": False}
    length = alone["input_ids"].shape[1]
    device = alone["input_ids"].device
    metadata = {
        "cu_seqlens": torch.tensor([0, length], dtype=torch.int32, device=device),
        "max_seqlen": length,
        "document_ids": torch.zeros(1, length, dtype=torch.int32, device=device),
    }
    inputs = {"input_ids": alone["input_ids"], "use_cache": False, **metadata}
    return implementation_name("sdpa_varlen"), {
        **inputs,
        **shifted_sparse_inputs(metadata, s2_group),
    }


def max_packing_error(
    model: PreTrainedModel,
    batch: Mapping[str, torch.Tensor | int],
    packed_inputs: Mapping[str, torch.Tensor | int] | None = None,
    with_grads: bool = True,
    s2_group: float | None = None,
) -> PackingError:
    """Compare the model on `batch` (fed as `packed_inputs`, default all of it) to each alone.

    The model runs packed with whatever attention it has; the reference runs every sample of
    every row on its own, with stock attention and no packing metadata. Logits are compared
    without gradients; the gradients of the summed target losses come from the training
    micro-step (tiled loss), packed once and then sample by sample, so memory stays that of one
    training step on the batch, not of every sample's graph at once. With `s2_group`, packed
    and alone both run shifted sparse attention with that group size.
    """
    if packed_inputs is None:
        packed_inputs = {key: value for key, value in batch.items() if key != "labels"}
    if s2_group is not None:
        packed_inputs = {**packed_inputs, **shifted_sparse_inputs(batch, s2_group)}
    was_training = model.training
    packed_implementation = model.config._attn_implementation
    decoder = model.get_decoder()
    model.eval()  # no dropout: the comparison must be deterministic
    model.zero_grad(set_to_none=True)
    try:
        with torch.no_grad():
            packed_hidden = decoder(**packed_inputs).last_hidden_state
        if with_grads:
            _summed_loss_backward(model, batch, packed_inputs)
            packed_grads = _gradients(model)
            model.zero_grad(set_to_none=True)

        logit_error = 0.0
        for row, span, alone in _alone_batches(batch):
            reference, stock_inputs = _reference(alone, s2_group)
            model.set_attn_implementation(reference)
            with torch.no_grad():
                alone_hidden = decoder(**stock_inputs).last_hidden_state
            error = _max_logit_error(model, packed_hidden[row, span], alone_hidden[0])
            logit_error = max(logit_error, error)
            if with_grads:  # accumulates every sample's gradient in .grad
                _summed_loss_backward(model, alone, stock_inputs)
        grad_error = None
        if with_grads:
            grad_error = max(
                float((packed - alone).abs().max())
                for packed, alone in zip(packed_grads, _gradients(model), strict=True)
            )
    finally:
        model.zero_grad(set_to_none=True)
        model.set_attn_implementation(packed_implementation)
        model.train(was_training)
    return PackingError(logits=logit_error, grads=grad_error)


def _summed_loss_backward(
    model: PreTrainedModel, batch: Mapping[str, Any], inputs: Mapping[str, Any]
) -> None:
    """Back-propagate the sum of `batch`'s target-token losses (a token mean over 1)."""

    def scorer(scored: Mapping[str, Any]) -> TokenLosses:
        return model_token_losses(model, scored, DEFAULT_LOSS_CHUNK_TOKENS, inputs=inputs)

    micro_step(scorer, batch, "token_mean", denominator=1)


def check_backends(
    model: PreTrainedModel,
    rows: Sequence[Mapping[str, np.ndarray]],
    pad_to_multiple_of: int | None = None,
    backends: Sequence[str] | None = None,
    s2_group: float | None = None,
) -> dict[str, PackingError | str]:
    """Run the invariant for every backend (default: all available); reasons for the rest."""
    device = next(model.parameters()).device
    batch = {
        key: value.to(device) if isinstance(value, torch.Tensor) else value
        for key, value in collate(rows, pad_to_multiple_of).items()
    }
    results: dict[str, PackingError | str] = {}
    original_implementation = model.config._attn_implementation
    try:
        for backend in backends or available_backends(device, needs_grad=False):
            reason = unavailable_reason(backend, device, needs_grad=False)
            if reason:
                results[backend] = reason
                continue
            trainable = unavailable_reason(backend, device, needs_grad=True) is None
            set_attention(model, backend)
            results[backend] = max_packing_error(
                model, batch, with_grads=trainable, s2_group=s2_group
            )
    finally:
        model.set_attn_implementation(original_implementation)
    return results
