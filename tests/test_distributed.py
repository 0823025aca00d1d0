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

from longdata.trainer.distributed import kv_replication
from tests.builders import make_row, two_bucket_build
from tests.multiprocess import run_on_ranks, run_torchrun

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
MEMORY_TECHNIQUES = {
    "gradient_checkpointing": True,
    "loss_chunk_tokens": 4,
    "tiled_mlp": True,
    "mlp_chunk_tokens": 8,
    "offload_activations": True,
}


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
    """On each of 2 ranks: SP=2 logits, loss and gradients vs the same model in one process
    (sdpa_varlen and sdpa_mask; flex forward only, as it has no backward on CPU)."""
    import torch.distributed as dist

    from longdata.trainer import collate, load_model
    from longdata.trainer.distributed import (
        enable_sequence_parallel,
        init_parallel,
        shard_batch,
        shutdown_parallel,
    )
    from longdata.trainer.loss import micro_batch_loss, model_token_losses, step_denominator

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
                for mine, theirs in zip(parallel.parameters(), reference.parameters(), strict=True):
                    dist.all_reduce(mine.grad, group=context.sp_group)
                    grad_error = max(grad_error, float((mine.grad - theirs.grad).abs().max()))

                errors[f"{preset}/{backend}/{loss_mode}"] = {
                    "logits": _sp_logit_error(parallel, reference, batch, shard, context),
                    "loss": abs(float(summed_loss - expected_loss)),
                    "grads": grad_error,
                    "max_grad": max(float(p.grad.abs().max()) for p in reference.parameters()),
                }
        # FlexAttention has no backward on CPU: its SP logits alone are checked.
        reference = load_model(preset, "flex", vocab_size=VOCAB, seed=0)
        parallel = load_model(preset, "flex", vocab_size=VOCAB, seed=0)
        enable_sequence_parallel(parallel, "flex", context.sp_group)
        errors[f"{preset}/flex/forward-only"] = {
            "logits": _sp_logit_error(parallel, reference, batch, shard, context)
        }
    Path(f"{result_path}.{context.rank}").write_text(json.dumps(errors))
    # Left joined, gloo's threads may still run at interpreter exit: std::terminate, SIGABRT
    # (seen once, on a loaded machine, after both ranks had written their results).
    shutdown_parallel(context)


def _sp_logit_error(parallel, reference, batch: dict, shard: dict, context) -> float:
    """Largest difference between the gathered SP logits and the one-process logits."""
    import torch.distributed as dist

    with torch.no_grad():
        expected = reference(**batch).logits
        logits = parallel(**shard).logits
        gathered = [torch.empty_like(logits) for _ in range(context.sp_size)]
        dist.all_gather(gathered, logits, group=context.sp_group)
    real_tokens = batch["sample_ids"] >= 0  # padding is nobody's sample
    return float((torch.cat(gathered, dim=1) - expected).abs()[real_tokens].max())


def test_sequence_parallel_equals_single_process(tmp_path: Path) -> None:
    result_path = str(tmp_path / "errors.json")
    run_on_ranks(_sequence_parallel_rank, 2, result_path)
    for rank in range(2):
        errors = json.loads(Path(f"{result_path}.{rank}").read_text())
        assert len(errors) == 10
        for case, error in errors.items():
            largest_grad = error.pop("max_grad", None)
            assert largest_grad is None or largest_grad > 1e-3, case  # grads not all zero
            assert max(error.values()) <= SP_TOLERANCE, (case, error)


# ---------------------------------------------------------------------------------------------
# Data parallelism: rows, DDP, FSDP


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 rows in two buckets, every row distinct (random tokens)."""
    return two_bucket_build(tmp_path_factory.mktemp("build"), VOCAB, (10, 30), 64)


def _row_key(row: dict) -> str:
    return row["input_ids"].tobytes().hex()


def _rows_seen_rank(build_dir: str, result_path: str) -> None:
    """One epoch's rows on this rank, without and with replication=2."""
    import torch.distributed as dist

    from longdata.trainer.data import Manifest, make_dataset

    dist.init_process_group("gloo")
    seen = {}
    for replication in (1, 2):
        dataset = make_dataset(Manifest.read(build_dir), "train", 2, replication=replication)
        seen[replication] = [_row_key(row) for row in dataset]
    Path(f"{result_path}.{dist.get_rank()}").write_text(json.dumps(seen))
    dist.destroy_process_group()


def test_ranks_see_disjoint_rows_or_replicated_rows(build: Path, tmp_path: Path) -> None:
    from longdata.trainer.data import Manifest, make_dataset

    # One process's epoch. (Streams are mixed by token proportion, so an epoch may repeat a
    # row of one bucket and skip one of another: compare with it, not with the build's rows.)
    one_process = [_row_key(row) for row in make_dataset(Manifest.read(build), "train", 2)]

    result_path = str(tmp_path / "rows.json")
    run_on_ranks(_rows_seen_rank, 2, str(build), result_path)
    rank0, rank1 = (json.loads(Path(f"{result_path}.{r}").read_text()) for r in range(2))
    # Data parallel: each rank half of that epoch; together exactly its rows, none extra.
    assert len(rank0["1"]) == len(rank1["1"]) == len(one_process) // 2
    assert sorted(rank0["1"] + rank1["1"]) == sorted(one_process)
    repeated = {row for row in one_process if one_process.count(row) > 1}
    assert not (set(rank0["1"]) & set(rank1["1"])) - repeated
    # replication=2 (one SP group of 2 ranks): both ranks read the same rows in the same order.
    assert rank0["2"] == rank1["2"] and sorted(rank0["2"]) == sorted(one_process)


def _training_rank(build_dir: str, out_root: str, runs: dict[str, dict]) -> None:
    """Short training runs on this rank (each with 1 row per DP rank and step)."""
    import torch.distributed as dist

    from longdata.trainer.loop import train

    dist.init_process_group("gloo")
    for name, settings in runs.items():
        out_dir = f"{out_root}/{settings.pop('out_dir', name)}"
        result = train(_train_config(build_dir, out_dir, batch_size=1, **settings))
        losses = [metrics.loss for metrics in result.metrics]
        Path(f"{out_root}/{name}.losses.{dist.get_rank()}").write_text(json.dumps(losses))
    dist.destroy_process_group()


def _train_config(build_dir: str, out_dir: str, **overrides: object):
    from longdata.trainer.loop import TrainConfig

    settings = {
        "build_dir": build_dir,
        "out_dir": out_dir,
        "steps": 3,
        "lr": 1e-2,
        "warmup_steps": 1,
        "save": "none",
        "progress": False,
        "attention": "sdpa_varlen",
    }
    return TrainConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def one_process_losses(build: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Per-step losses of one process reading 1 or 2 rows per step."""
    from longdata.trainer.loop import train

    out_root = tmp_path_factory.mktemp("one_process")
    return {
        rows: [
            m.loss
            for m in train(
                _train_config(str(build), str(out_root / str(rows)), batch_size=rows)
            ).metrics
        ]
        for rows in (1, 2)
    }


def _assert_losses_match(out_root: Path, name: str, ranks: int, expected: list[float]) -> None:
    for rank in range(ranks):
        losses = json.loads((out_root / f"{name}.losses.{rank}").read_text())
        assert np.allclose(losses, expected, rtol=0, atol=LOSS_TOLERANCE), (name, losses, expected)


def test_ddp_fsdp_and_sp_match_one_process(
    build: Path, tmp_path: Path, one_process_losses: dict
) -> None:
    """Streaming gives the world the same global batches whatever the number of ranks, and the
    loss is normalised over all ranks, so 2 DP ranks x 1 row must equal 1 process x 2 rows,
    and one SP group of 2 ranks x 1 row must equal 1 process x 1 row."""
    runs = {
        "ddp": {"parallel": "ddp"},
        "fsdp": {"parallel": "fsdp", "checkpoint_every": 2, "save": "merged"},
        # Resumes from the step-2 checkpoint of "fsdp" and redoes its step 3.
        "fsdp_resumed": {"parallel": "fsdp", "resume": str(tmp_path / "fsdp"), "out_dir": "fsdp"},
        "sp2": {"parallel": "ddp", "sp": 2},
        # The memory techniques change no loss under FSDP or SP (chunks small enough to split).
        "fsdp_memory": {"parallel": "fsdp", **MEMORY_TECHNIQUES},
        "sp2_memory": {"parallel": "ddp", "sp": 2, **MEMORY_TECHNIQUES},
    }
    run_on_ranks(_training_rank, 2, str(build), str(tmp_path), runs)
    for name, rows in (("ddp", 2), ("fsdp", 2), ("sp2", 1), ("fsdp_memory", 2), ("sp2_memory", 1)):
        _assert_losses_match(tmp_path, name, 2, one_process_losses[rows])
    _assert_losses_match(tmp_path, "fsdp_resumed", 2, one_process_losses[2][2:])
    # Rank 0 alone writes: one metrics line per step, an FSDP checkpoint with whole weights.
    assert (tmp_path / "ddp" / "metrics.jsonl").read_text().count("\n") == 3
    checkpoint = torch.load(
        tmp_path / "fsdp" / "checkpoints" / "step_0000002" / "state.pt", weights_only=True
    )
    assert checkpoint["model"]["model.embed_tokens.weight"].shape == (VOCAB, 128)
    assert len(checkpoint["rng"]) == 2
    assert (tmp_path / "fsdp" / "final" / "config.json").is_file()


def test_fsdp_with_two_dp_by_two_sp_ranks_matches_one_process(
    build: Path, tmp_path: Path, one_process_losses: dict
) -> None:
    """4 ranks as a 2 x 2 DP x SP mesh: rows go to the right SP groups, shards to the right
    ranks, and the step equals one process reading 2 rows."""
    runs = {"fsdp_dp2_sp2": {"parallel": "fsdp", "sp": 2}}
    run_on_ranks(_training_rank, 4, str(build), str(tmp_path), runs)
    _assert_losses_match(tmp_path, "fsdp_dp2_sp2", 4, one_process_losses[2])


# ---------------------------------------------------------------------------------------------
# End to end


def test_torchrun_cli_trains_and_resumes_exactly(build: Path, tmp_path: Path) -> None:
    """`torchrun -m longdata.cli train` on 2 ranks; a resume redoes step 3 with the same loss."""
    out = tmp_path / "run"
    arguments = ["-m", "longdata.cli", "train", str(build), "--out", str(out), "--steps", "3"]
    arguments += ["--parallel", "ddp", "--checkpoint-every", "2", "--attention", "sdpa_varlen"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    first = run_torchrun(2, arguments, cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stdout
    assert first.stdout.count("saved ") == 1  # rank 0 alone reports and saves
    assert (out / "final" / "config.json").is_file()
    first_steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    resumed = run_torchrun(2, [*arguments, "--resume", str(out)], cwd=tmp_path, env=env)
    assert resumed.returncode == 0, resumed.stdout
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3]  # step 3, redone, is logged once
    assert steps[2]["loss"] == first_steps[2]["loss"]
    assert steps[0]["tokens"] > 0 and steps[0]["loss_per_source"]
