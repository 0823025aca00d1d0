"""The training micro-step: forward, loss and backward on one micro-batch.

The loop, the tests, `check-packing` and the benchmarks all run this one function, so what
they measure or check is what training does. The optimizer step, gradient clipping and the
step's normaliser (`trainer.loss.step_denominator`) belong to the caller: a step may
accumulate several micro-batches.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from longdata.trainer.loss import TokenLosses, micro_batch_loss

# A TargetScorer (returning a tuple, as DDP / FSDP need) or any function giving TokenLosses.
Scorer = Callable[
    [Mapping[str, Any]], TokenLosses | tuple[torch.Tensor, torch.Tensor, torch.Tensor]
]


@dataclass(frozen=True)
class MicroStep:
    """What one micro-batch contributed: its share of the step loss and its target losses."""

    loss: float
    losses: TokenLosses  # detached


def micro_step(
    scorer: Scorer,
    batch: Mapping[str, Any],
    loss_mode: str,
    denominator: int,
    *,
    precision: AbstractContextManager[Any] | None = None,
    gradient_scale: float = 1.0,
) -> MicroStep:
    """Score `batch` with `scorer` (a `trainer.loss.TargetScorer`, possibly wrapped in DDP or
    FSDP), and back-propagate its share of the step loss times `gradient_scale`.

    `precision` is the autocast context the forward runs in (default none: the model's dtype).
    Gradients accumulate in the parameters' `.grad`, as over a step's micro-batches.
    """
    with precision if precision is not None else nullcontext():
        scored = scorer(batch)
    losses = scored if isinstance(scored, TokenLosses) else TokenLosses(*scored)
    loss = micro_batch_loss(losses, batch, loss_mode, denominator)
    (loss * gradient_scale).backward()
    return MicroStep(
        loss=float(loss.detach()),
        losses=TokenLosses(
            values=losses.values.detach(),
            sample_ids=losses.sample_ids,
            source_ids=losses.source_ids,
        ),
    )
