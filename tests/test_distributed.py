"""Multi-rank training on gloo: SP equivalence, disjoint rows, DDP / FSDP, torchrun end to end.

Every multi-process test spawns its ranks once and checks several things inside, because
starting a rank (importing torch and transformers) costs more than the tiny models' steps.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.builders import make_row, write_build
from tests.multiprocess import run_on_ranks, run_torchrun
from trainer.distributed import kv_replication

VOCAB = 256
# fp32 on CPU: the SP path sums the same terms in another order (per-rank partial losses and
# gradients summed across ranks), so results agree to rounding, far below 1e-5.
SP_TOLERANCE = 1e-5
# DDP / FSDP / one process: same rows per step, but gradients are reduced across ranks in
# another order; after a few AdamW steps the losses agree to ~1e-6.
LOSS_TOLERANCE = 1e-5
# Row lengths 29 and 25, padded to 30: the shard boundary at 15 falls inside a sample of
# each row (7 + 12 and 5 + 17 tokens), so samples straddle the two ranks.
STRADDLING_ROWS = [[7, 12, 1, 9], [5, 17, 3]]


def test_kv_heads_are_replicated_when_they_do_not_divide() -> None:
    assert kv_replication(num_heads=4, num_kv_heads=2, sp_size=2) == 1
    assert kv_replication(num_heads=4, num_kv_heads=1, sp_size=2) == 2  # tiny-qwen2
    assert kv_replication(num_heads=8, num_kv_heads=2, sp_size=4) == 2


def test_query_heads_must_divide_by_sp() -> None:
    with pytest.raises(ValueError, match="4 query heads do not divide by sp=3"):
        kv_replication(num_heads=4, num_kv_heads=2, sp_size=3)


# ---------------------------------------------------------------------------------------------
# Sequence parallelism


def _sequence_parallel_rank(result_path: str) -> None:
    """On each of 2 ranks: SP=2 logits, loss and gradients vs the same model in one process."""
    import torch.distributed as dist

    from trainer import collate, load_model
    from trainer.distributed import enable_sequence_parallel, init_parallel, shard_batch
    from trainer.loss import micro_batch_loss, model_token_losses, step_denominator

    context = init_parallel(sp_size=2)
    rng = np.random.default_rng(0)
    batch = collate([make_row(lens, rng, VOCAB) for lens in STRADDLING_ROWS], 2)
    shard = shard_batch(batch, context.sp_rank, context.sp_size)
    errors = {}
    for preset in ("tiny-llama", "tiny-qwen2"):
        for backend in ("sdpa_varlen", "sdpa_mask"):
            for loss_mode in ("token_mean", "sequence_mean"):
                reference = load_model(preset, backend, vocab_size=VOCAB, seed=0)
                parallel = load_model(preset, backend, vocab_size=VOCAB, seed=0)
                enable_sequence_parallel(parallel, backend, context.sp_group)

                denominator = step_denominator(loss_mode, [batch])
                expected_loss = micro_batch_loss(
                    model_token_losses(reference, batch), batch, loss_mode, denominator
                )
                expected_loss.backward()
                loss = micro_batch_loss(
                    model_token_losses(parallel, shard), shard, loss_mode, denominator
                )
                loss.backward()
                summed_loss = loss.detach().clone()
                dist.all_reduce(summed_loss, group=context.sp_group)
                grad_error = 0.0
                for mine, theirs in zip(
                    parallel.parameters(), reference.parameters(), strict=True
                ):
                    dist.all_reduce(mine.grad, group=context.sp_group)
                    grad_error = max(grad_error, float((mine.grad - theirs.grad).abs().max()))

                with torch.no_grad():
                    expected_logits = reference(**batch).logits
                    logits = parallel(**shard).logits
                    gathered = [torch.empty_like(logits) for _ in range(context.sp_size)]
                    dist.all_gather(gathered, logits, group=context.sp_group)
                real_tokens = batch["sample_ids"] >= 0  # padding is nobody's sample
                logit_difference = (torch.cat(gathered, dim=1) - expected_logits).abs()
                errors[f"{preset}/{backend}/{loss_mode}"] = {
                    "loss": abs(float(summed_loss - expected_loss)),
                    "logits": float(logit_difference[real_tokens].max()),
                    "grads": grad_error,
                    "max_grad": max(float(p.grad.abs().max()) for p in reference.parameters()),
                }
    Path(f"{result_path}.{context.rank}").write_text(json.dumps(errors))


def test_sequence_parallel_equals_single_process(tmp_path: Path) -> None:
    result_path = str(tmp_path / "errors.json")
    run_on_ranks(_sequence_parallel_rank, 2, result_path)
    for rank in range(2):
        errors = json.loads(Path(f"{result_path}.{rank}").read_text())
        assert len(errors) == 8
        for case, error in errors.items():
            assert error["max_grad"] > 1e-3, case  # the gradients compared are not all zero
            assert max(error["loss"], error["logits"], error["grads"]) <= SP_TOLERANCE, (
                case,
                error,
            )
