"""The packing invariant: a packed sample behaves exactly as if it were alone.

For every sample of a packed batch, its logits must equal those of running the sample alone
through the same model with stock (eager) attention, and the gradients of the summed per-sample
losses must equal the gradients of the same losses computed sample by sample. Used by the tests
and by `longdata check-packing` on real rows.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from trainer.attention import available_backends, unavailable_reason
from trainer.collation import IGNORE_INDEX, collate
from trainer.model import set_attention


@dataclass(frozen=True)
class PackingError:
    """Largest absolute differences between packed and one-sample-at-a-time results."""

    logits: float
    grads: float | None  # None when the backward pass was not checked


def summed_target_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies over labelled positions (labels shifted by one)."""
    return F.cross_entropy(
        logits[..., :-1, :].flatten(0, -2).float(),
        labels[..., 1:].flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def _gradients(model: PreTrainedModel) -> list[torch.Tensor]:
    return [
        (p.grad if p.grad is not None else torch.zeros_like(p)).detach().clone()
        for p in model.parameters()
        if p.requires_grad
    ]


def max_packing_error(
    model: PreTrainedModel,
    batch: Mapping[str, torch.Tensor | int],
    packed_inputs: Mapping[str, torch.Tensor | int] | None = None,
    with_grads: bool = True,
) -> PackingError:
    """Compare the model on `batch` (fed as `packed_inputs`, default all of it) to each alone.

    The model runs packed with whatever attention it has; the reference runs every sample of
    every row on its own, with transformers' stock eager attention and no packing metadata.
    """
    packed_inputs = batch if packed_inputs is None else packed_inputs
    was_training = model.training
    packed_implementation = model.config._attn_implementation
    model.eval()  # no dropout: the comparison must be deterministic
    with torch.set_grad_enabled(with_grads):
        model.zero_grad(set_to_none=True)
        packed_logits = model(**packed_inputs).logits
        if with_grads:
            summed_target_loss(packed_logits, batch["labels"]).backward()
            packed_grads = _gradients(model)
            model.zero_grad(set_to_none=True)

        model.set_attn_implementation("eager")
        try:
            logit_error = 0.0
            alone_loss = packed_logits.new_zeros(())
            boundaries = batch["cu_seqlens"].tolist()
            length = batch["input_ids"].shape[1]
            for start, end in itertools.pairwise(boundaries):
                row, offset = divmod(start, length)
                span = slice(offset, offset + end - start)
                if batch["sample_ids"][row, offset] < 0:
                    continue  # a padding segment: not a sample
                logits = model(input_ids=batch["input_ids"][row : row + 1, span], use_cache=False)
                difference = (logits.logits[0] - packed_logits[row, span]).abs().max()
                logit_error = max(logit_error, float(difference.detach()))
                if with_grads:
                    alone_loss = alone_loss + summed_target_loss(
                        logits.logits[0], batch["labels"][row, span]
                    )
            grad_error = None
            if with_grads:
                alone_loss.backward()
                grad_error = max(
                    float((packed - alone).abs().max())
                    for packed, alone in zip(packed_grads, _gradients(model), strict=True)
                )
                model.zero_grad(set_to_none=True)
        finally:
            model.set_attn_implementation(packed_implementation)
            model.train(was_training)
    return PackingError(logits=logit_error, grads=grad_error)


def check_backends(
    model: PreTrainedModel,
    rows: Sequence[Mapping[str, np.ndarray]],
    pad_to_multiple_of: int | None = None,
    backends: Sequence[str] | None = None,
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
            results[backend] = max_packing_error(model, batch, with_grads=trainable)
    finally:
        model.set_attn_implementation(original_implementation)
    return results
