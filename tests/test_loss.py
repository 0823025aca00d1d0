"""Both loss modes against a hand computation, including across gradient accumulation."""

import math

import numpy as np
import torch

from longdata.trainer import collate
from longdata.trainer.loss import micro_batch_loss, step_denominator, token_losses
from tests.builders import make_row


def _hand_losses(logits: torch.Tensor, batch: dict) -> dict[int, list[float]]:
    """Per sample: the loss of each target token, computed one position at a time."""
    per_sample: dict[int, list[float]] = {}
    batch_size, length, _ = logits.shape
    for row in range(batch_size):
        for t in range(1, length):
            label = int(batch["labels"][row, t])
            if label == -100:
                continue
            log_probs = torch.log_softmax(logits[row, t - 1].double(), dim=-1)
            sample = int(batch["sample_ids"][row, t])
            per_sample.setdefault(sample, []).append(-float(log_probs[label]))
    return per_sample


def _batches() -> list[dict]:
    rng = np.random.default_rng(3)
    first = collate([make_row([3, 9, 2], rng, 50), make_row([12], rng, 50)], pad_to_multiple_of=8)
    second = collate([make_row([1, 4, 20], rng, 50)])  # a one-token sample has no target
    return [first, second]


def test_token_and_sequence_mean_match_hand_computation() -> None:
    torch.manual_seed(0)
    batches = _batches()
    logits = [torch.randn(*b["input_ids"].shape, 50) for b in batches]
    hand = [_hand_losses(lg, b) for lg, b in zip(logits, batches, strict=True)]
    all_tokens = [v for per_sample in hand for values in per_sample.values() for v in values]
    all_samples = [values for per_sample in hand for values in per_sample.values()]
    expected = {
        "token_mean": sum(all_tokens) / len(all_tokens),
        "sequence_mean": sum(sum(v) / len(v) for v in all_samples) / len(all_samples),
    }
    assert not math.isclose(expected["token_mean"], expected["sequence_mean"], rel_tol=1e-3)
    for mode, value in expected.items():
        denominator = step_denominator(mode, batches)
        # Accumulating the micro-batch shares gives the loss of the whole step.
        accumulated = sum(
            float(micro_batch_loss(token_losses(lg, b), b, mode, denominator))
            for lg, b in zip(logits, batches, strict=True)
        )
        assert math.isclose(accumulated, value, rel_tol=1e-5), mode
