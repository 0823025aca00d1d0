"""Shifted sparse attention (LongLoRA's S2-Attn): groups inside samples, packed == alone."""

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from longdata.trainer import attention, collate
from longdata.trainer.attention import (
    BACKEND_FUNCTIONS,
    group_cu_seqlens,
    segment_group_size,
    shifted_sparse_allowed,
    shifted_sparse_inputs,
    unavailable_reason,
)
from longdata.trainer.check import check_backends
from longdata.trainer.config import ConfigError, TrainConfig
from longdata.trainer.loop import train
from longdata.trainer.loss import model_token_losses
from longdata.trainer.model import load_model
from longdata.trainer.step import micro_step
from tests.builders import make_row, two_bucket_build
from tests.test_loop import VOCAB, _config, staged  # noqa: F401  (staged is a fixture)

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8
CPU_BACKENDS = [
    name
    for name in ("sdpa_mask", "sdpa_varlen", "flex")
    if unavailable_reason(name, "cpu", needs_grad=False) is None
]


def _batch(lengths: list[list[int]], seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return collate([make_row(row, rng, VOCAB) for row in lengths])


class _Eval(torch.nn.Module):
    training = False


def test_a_group_planted_across_a_sample_boundary_is_cut_there() -> None:
    # Samples of 5 and 11 tokens with G = 4: the unshifted groups of sample one are [0,4) [4,5)
    # and the shifted half's groups [0,2) [2,5); a group of 4 starting at 4 or a shifted group
    # starting at 2 would cross into sample two at position 5 if the row were grouped whole.
    batch = _batch([[5, 11]])
    ids = shifted_sparse_inputs(batch, 4)["s2_group_ids"]
    document = batch["document_ids"][0]
    for half in (0, 1):
        for a, b in itertools.combinations(range(16), 2):
            if ids[half, 0, a] == ids[half, 0, b]:
                assert document[a] == document[b]
    assert ids[0, 0].tolist() == [0, 0, 0, 0, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4]
    assert ids[1, 0].tolist() == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5]
    allowed = shifted_sparse_allowed(ids, HEADS)
    crossing = document[:, None] != document[None, :]
    assert not allowed[:, :, crossing].any()


@pytest.mark.parametrize("s2_group", [0.25, 3, 0.5])
def test_varlen_group_boundaries_equal_the_mask(s2_group: float) -> None:
    batch = _batch([[7, 2, 13], [1, 21]])
    ids = shifted_sparse_inputs(batch, s2_group)["s2_group_ids"]
    allowed = shifted_sparse_allowed(ids, HEADS)
    rows, length = batch["document_ids"].shape
    for half, (cu_seqlens, max_seqlen) in enumerate(group_cu_seqlens(ids)):
        segment = torch.zeros(rows * length, dtype=torch.long)
        for number, (start, end) in enumerate(itertools.pairwise(cu_seqlens.tolist())):
            segment[start:end] = number
        segment = segment.reshape(rows, length)
        from_bounds = (segment[:, :, None] == segment[:, None, :]) & torch.ones(
            length, length, dtype=torch.bool
        ).tril()
        head = 0 if half == 0 else HEADS - 1
        assert torch.equal(from_bounds, allowed[:, head])
        assert max_seqlen == int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


def _qkv(batch: dict, dtype: torch.dtype, seed: int = 1) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    rows, length = batch["document_ids"].shape
    shapes = [(rows, HEADS, length, HEAD_DIM), *[(rows, KV_HEADS, length, HEAD_DIM)] * 2]
    return tuple(torch.randn(s, generator=generator, dtype=torch.float64).to(dtype) for s in shapes)


def _attend(backend: str, batch: dict, q, k, v, s2_group: float | None) -> torch.Tensor:
    extra = shifted_sparse_inputs(batch, s2_group) if s2_group is not None else {}
    with torch.no_grad():
        output, _ = BACKEND_FUNCTIONS[backend](
            _Eval(),
            q,
            k,
            v,
            None,
            cu_seqlens=batch["cu_seqlens"],
            max_seqlen=batch["max_seqlen"],
            document_ids=batch["document_ids"],
            **extra,
        )
    return output


def _packed_and_alone(backend: str, dtype: torch.dtype, s2_group: float):
    lengths = [9, 17, 4, 30]
    packed = _batch([lengths])
    q, k, v = _qkv(packed, torch.float64)
    out = _attend(backend, packed, q.to(dtype), k.to(dtype), v.to(dtype), s2_group)
    pairs = []
    for start, end in itertools.pairwise(packed["cu_seqlens"].tolist()):
        alone = _batch([[end - start]])
        span = slice(start, end)
        a_q, a_k, a_v = (t[:, :, span] for t in (q, k, v))
        exact = _attend("sdpa_varlen", alone, a_q, a_k, a_v, s2_group)
        rounded = _attend(backend, alone, a_q.to(dtype), a_k.to(dtype), a_v.to(dtype), s2_group)
        pairs.append((out[:, span].double(), rounded.double(), exact))
    return pairs


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("s2_group", [0.25, 5])
def test_packed_equals_alone_in_fp64(backend: str, s2_group: float) -> None:
    for packed, _, exact in _packed_and_alone(backend, torch.float64, s2_group):
        torch.testing.assert_close(packed, exact, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_packed_equals_alone_in_bf16_to_rounding(backend: str) -> None:
    for packed, rounded, exact in _packed_and_alone(backend, torch.bfloat16, 0.25):
        # The packed bf16 result is as close to the fp64 truth as the alone bf16 one is.
        rounding = float((rounded - exact).abs().max())
        assert float((packed - exact).abs().max()) <= 2 * rounding + 1e-2


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_shifted_heads_differ_from_unshifted_and_large_groups_are_full(backend: str) -> None:
    batch = _batch([[12, 20]])
    q, k, v = _qkv(batch, torch.float64)
    # Every head sees the same inputs: any difference between halves comes from the groups.
    q, k, v = (t[:, :1].expand(-1, n, -1, -1) for t, n in ((q, HEADS), (k, KV_HEADS), (v, 2)))
    out = _attend(backend, batch, q, k, v, 0.25)
    assert not torch.allclose(out[:, :, 0], out[:, :, HEADS - 1])
    assert torch.allclose(out[:, :, 0], out[:, :, 1])
    full = _attend(backend, batch, q, k, v, None)
    assert not torch.allclose(out, full)
    whole = _attend(backend, batch, q, k, v, 64)
    torch.testing.assert_close(whole, full, rtol=0, atol=1e-12)
    assert segment_group_size(12, 64) == 12 and segment_group_size(12, 0.25) == 3


def test_model_step_gradients_packed_equal_alone() -> None:
    model = load_model("tiny-llama", "sdpa_varlen", vocab_size=VOCAB, dtype=torch.float64, seed=0)
    lengths = [9, 23, 14]
    row = make_row(lengths, np.random.default_rng(4), VOCAB)

    def gradients(batch: dict) -> list[torch.Tensor]:
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        inputs.update(shifted_sparse_inputs(batch, 0.25))

        def scorer(scored):
            return model_token_losses(model, scored, 0, inputs=inputs)

        micro_step(scorer, batch, "token_mean", denominator=1)
        return [p.grad.clone() for p in model.parameters()]

    packed_grads = gradients(collate([row]))
    summed = [torch.zeros_like(g) for g in packed_grads]
    starts = np.cumsum([0, *lengths])
    for index, (start, end) in enumerate(itertools.pairwise(starts)):
        model.zero_grad(set_to_none=True)
        alone = {
            "input_ids": row["input_ids"][start:end],
            "loss_mask": row["loss_mask"][start:end],
            "seq_lens": row["seq_lens"][index : index + 1],
            "source_ids": row["source_ids"][index : index + 1],
        }
        summed = [a + b for a, b in zip(summed, gradients(collate([alone])), strict=True)]
    for a, b in zip(packed_grads, summed, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_training_steps_use_groups_and_validation_uses_full_attention(
    staged: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[bool, bool]] = []
    reference = BACKEND_FUNCTIONS["sdpa_varlen"]

    def spy(module, *args, **kwargs):
        calls.append((module.training, kwargs.get("s2_group_ids") is not None))
        return reference(module, *args, **kwargs)

    monkeypatch.setitem(BACKEND_FUNCTIONS, "sdpa_varlen", spy)
    settings = {"stage_steps": [2, 3], "steps": 5, "batch_size": 1, "grad_accum": 1}
    sparse = train(
        _config(
            staged, tmp_path / "s2", eval_every=2, attention_pattern="shifted_sparse", **settings
        )
    )
    assert {grouped for training, grouped in calls if training} == {True}
    assert {grouped for training, grouped in calls if not training} == {False}
    monkeypatch.setitem(BACKEND_FUNCTIONS, "sdpa_varlen", reference)
    full = train(_config(staged, tmp_path / "full", **settings))
    assert sparse.metrics[0].loss != full.metrics[0].loss


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"attention_pattern": "sparse"}, "attention_pattern must be one of"),
        ({"s2_group": 1.5}, "s2_group must be"),
        ({"s2_group": 0}, "s2_group must be"),
        ({"s2_group": 1}, "s2_group must be"),
        ({"attention_pattern": "shifted_sparse", "sp": 2}, "sp > 1"),
    ],
)
def test_bad_settings_are_one_line(settings: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as error:
        TrainConfig(build_dir="b", **settings).validate()
    assert "\n" not in str(error.value)


def _check_rows() -> list[dict]:
    rng = np.random.default_rng(7)
    return [make_row([13, 5, 30], rng, VOCAB), make_row([40, 8], rng, VOCAB)]


def test_check_packing_under_the_pattern_passes_and_catches_a_leaky_mask(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = load_model("tiny-llama", "sdpa_mask", vocab_size=VOCAB, seed=0)
    results = check_backends(model, _check_rows(), backends=CPU_BACKENDS, s2_group=0.25)
    for result in results.values():
        assert result.ok, result.line()

    def leaky(s2_group_ids: torch.Tensor, heads: int) -> torch.Tensor:
        # Causal over the whole row: groups and samples both ignored.
        _, rows, length = s2_group_ids.shape
        return torch.ones(rows, heads, length, length, dtype=torch.bool).tril()

    monkeypatch.setattr(attention, "_s2_dense_mask", leaky)
    leaked = check_backends(model, _check_rows(), backends=["sdpa_mask"], s2_group=0.25)
    assert not leaked["sdpa_mask"].ok
    assert leaked["sdpa_mask"].logits.error > 1e-3


def test_check_packing_cli_takes_the_pattern_and_refuses_a_bad_group(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from longdata.cli import app

    build = two_bucket_build(tmp_path / "build", VOCAB, (10, 40), 80)
    runner = CliRunner()
    common = ["check-packing", str(build), "--rows", "1", "--attention-pattern", "shifted_sparse"]
    done = runner.invoke(app, [*common, "--s2-group", "0.25"])
    assert done.exit_code == 0, done.output
    assert "sdpa_varlen" in done.output
    refused = runner.invoke(app, [*common, "--s2-group", "1.5"])
    assert refused.exit_code != 0 and "s2_group must be" in refused.output
    assert "Traceback" not in refused.output


def test_attention_flops_count_groups_not_samples() -> None:
    from longdata.trainer.flops import squared_group_lengths, squared_sample_lengths

    batch = _batch([[8, 3]])
    groups = shifted_sparse_inputs(batch, 4)["s2_group_ids"]
    # Unshifted: 4, 4 | 3 -> 41. Shifted: 2, 4, 2 | 3 (one group, unshifted) -> 33.
    assert squared_group_lengths(batch, groups) == (41 + 33) // 2
    assert squared_sample_lengths(batch) == 64 + 9
