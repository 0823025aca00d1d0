"""THE invariant: packed samples give the logits and gradients they give alone."""

import itertools
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from longdata.trainer import collate, load_model
from longdata.trainer.attention import (
    BACKENDS,
    available_backends,
    call_varlen_attn,
    implementation_name,
    unavailable_reason,
)
from longdata.trainer.check import max_packing_error
from longdata.trainer.model import set_attention
from tests.builders import make_row

TOLERANCE = 1e-5
VOCAB = 512
CPU_BACKENDS = available_backends("cpu", needs_grad=False)

# Several samples per row, a one-token sample, rows with different boundaries.
SINGLE_ROW = [[7, 12, 1, 9]]
TWO_ROWS = [[5, 17, 3], [11, 4, 9, 2]]


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-qwen2"])
def model(request: pytest.FixtureRequest) -> torch.nn.Module:
    return load_model(request.param, "sdpa_mask", vocab_size=VOCAB, seed=0)


def _batch(rows: list[list[int]], pad_to_multiple_of: int | None = None) -> dict:
    rng = np.random.default_rng(sum(map(sum, rows)))
    return collate([make_row(lens, rng, VOCAB) for lens in rows], pad_to_multiple_of)


@pytest.fixture(autouse=True)
def _quiet_flex() -> None:
    # Eager (uncompiled) flex on CPU warns that it is unfused; that is expected here.
    warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")


def test_sdpa_backends_are_available_on_cpu() -> None:
    assert {"sdpa_varlen", "sdpa_mask", "flex"} <= set(CPU_BACKENDS)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    ("rows", "pad_to_multiple_of"),
    [(SINGLE_ROW, None), (TWO_ROWS, None), (TWO_ROWS, 16)],
    ids=["one-row", "two-rows", "two-rows-padded"],
)
def test_packed_equals_alone(
    model: torch.nn.Module, backend: str, rows: list[list[int]], pad_to_multiple_of: int | None
) -> None:
    set_attention(model, backend)
    trainable = unavailable_reason(backend, "cpu", needs_grad=True) is None
    error = max_packing_error(model, _batch(rows, pad_to_multiple_of), with_grads=trainable)
    assert error.logits <= TOLERANCE
    if trainable:
        assert error.grads <= TOLERANCE
    else:
        assert backend == "flex"  # the only CPU backend without a backward pass


def test_auto_trains_exactly_on_cpu(model: torch.nn.Module) -> None:
    set_attention(model, "auto")
    error = max_packing_error(model, _batch(TWO_ROWS, 8))
    assert error.logits <= TOLERANCE and error.grads <= TOLERANCE


def test_negative_control_default_attention_leaks(model: torch.nn.Module) -> None:
    """Restarted position_ids with a stock model's defaults do not separate samples.

    This shows the comparison above can see a leak: stock sdpa attention with the KV cache on
    (transformers' default) attends across the packed samples.
    """
    batch = _batch(TWO_ROWS)
    model.set_attn_implementation("sdpa")
    stock_inputs = {
        "input_ids": batch["input_ids"],
        "position_ids": batch["position_ids"],
        "use_cache": True,
    }
    error = max_packing_error(model, batch, packed_inputs=stock_inputs)
    assert error.logits > 1e-2
    assert error.grads > 1e-2


def test_flex_refuses_backward_on_cpu(model: torch.nn.Module) -> None:
    set_attention(model, "flex")
    model.train()
    with pytest.raises(RuntimeError, match="no backward pass on CPU"):
        model(**_batch(SINGLE_ROW))


def test_training_without_packing_metadata_is_refused(model: torch.nn.Module) -> None:
    set_attention(model, "sdpa_varlen")
    model.train()
    batch = _batch(SINGLE_ROW)
    with pytest.raises(RuntimeError, match="packing metadata"):
        model(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
    model.eval()


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b not in CPU_BACKENDS])
def test_unavailable_backends_say_what_is_missing(backend: str) -> None:
    reason = unavailable_reason(backend, "cpu", needs_grad=True)
    assert reason is not None and "CUDA" in reason
    if backend == "flash_attn":
        assert "pip install" in reason


@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
def test_registered_names_are_accepted_by_transformers(
    model: torch.nn.Module, backend: str
) -> None:
    """transformers 5 refuses any attn_implementation containing "flash" (a hub kernel name)."""
    name = implementation_name(backend)
    assert "flash" not in name
    set_attention(model, backend)
    assert model.config._attn_implementation == name


@pytest.mark.parametrize("backend", ["sdpa_varlen", "flash_attn"])
def test_cached_multi_token_continuation_sees_the_cache(
    model: torch.nn.Module, backend: str
) -> None:
    """Without packing metadata, a continuation of several tokens after a KV cache (scoring
    answers after a shared prompt) gets the logits of one forward pass over the whole text.

    `is_causal` alone would align the causal triangle top-left and hide cached keys."""
    from transformers import DynamicCache

    set_attention(model, backend)
    model.eval()
    tokens = torch.from_numpy(np.random.default_rng(1).integers(5, VOCAB, (1, 23)))
    with torch.no_grad():
        whole = model(input_ids=tokens, use_cache=False).logits
        cache = DynamicCache()
        first = model(input_ids=tokens[:, :17], past_key_values=cache, use_cache=True).logits
        rest = model(input_ids=tokens[:, 17:], past_key_values=cache, use_cache=True).logits
    assert torch.allclose(torch.cat([first, rest], dim=1), whole, atol=TOLERANCE)


def _causal_segments(query, key, value, cu_seq_q, scale, enable_gqa):
    """A CPU stand-in for torch's varlen kernel: [N, H, D] inputs, causal within segments."""
    bounds = cu_seq_q.tolist()
    pieces = [
        F.scaled_dot_product_attention(
            *(t[a:b].transpose(0, 1).float() for t in (query, key, value)),
            is_causal=True,
            scale=scale,
            enable_gqa=enable_gqa,
        ).transpose(0, 1)
        for a, b in itertools.pairwise(bounds)
    ]
    return torch.cat(pieces)


def varlen_with_window(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None,
                       window_size=(-1, -1), enable_gqa=False):  # fmt: skip
    """torch 2.13+'s signature: causal through window_size, GQA through enable_gqa."""
    assert window_size == (-1, 0)
    return _causal_segments(q, k, v, cu_seq_q, scale, enable_gqa)


def varlen_is_causal(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, is_causal=False,
                     return_aux=None, scale=None):  # fmt: skip
    """An older signature: causal through is_causal, no enable_gqa (KV heads must match)."""
    assert is_causal and k.shape[1] == q.shape[1]
    return _causal_segments(q, k, v, cu_seq_q, scale, enable_gqa=False)


def varlen_without_causal(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None):
    raise AssertionError("a varlen_attn that cannot be made causal must never be called")


@pytest.mark.parametrize("varlen_attn", [varlen_with_window, varlen_is_causal])
def test_torch_varlen_adapts_to_the_installed_signature(varlen_attn) -> None:
    """GQA inputs (4 query heads, 2 KV heads) give per-segment causal attention whichever
    signature torch's varlen_attn has: enable_gqa where offered, repeated KV heads where not."""
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, 4, 7, 8, generator=generator)
    key, value = (torch.randn(1, 2, 7, 8, generator=generator) for _ in range(2))
    cu_seqlens = torch.tensor([0, 3, 7])
    got = call_varlen_attn(varlen_attn, query, key, value, cu_seqlens, 4, 0.3)
    expected = torch.cat(
        [
            F.scaled_dot_product_attention(
                *(t[..., a:b, :].bfloat16().float() for t in (query, key, value)),
                is_causal=True,
                scale=0.3,
                enable_gqa=True,
            )
            for a, b in [(0, 3), (3, 7)]
        ],
        dim=2,
    ).transpose(1, 2)
    assert got.shape == (1, 7, 4, 8)
    assert torch.allclose(got, expected, atol=1e-5)


def test_torch_varlen_without_a_causal_argument_is_unavailable(monkeypatch) -> None:
    varlen = pytest.importorskip("torch.nn.attention.varlen")
    monkeypatch.setattr(varlen, "varlen_attn", varlen_without_causal)
    reason = unavailable_reason("torch_varlen", "cpu", needs_grad=False)
    assert reason is not None and "window_size or is_causal" in reason
    assert torch.__version__ in reason
    query = torch.zeros(1, 2, 3, 4)
    with pytest.raises(RuntimeError, match="window_size or is_causal"):
        call_varlen_attn(varlen_without_causal, query, query, query, torch.tensor([0, 3]), 3, None)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_packed_equals_alone_with_skipped_positions(model: torch.nn.Module, backend: str) -> None:
    """PoSE positions (position_span): each sample alone, with its own skipped positions."""
    rng = np.random.default_rng(3)
    rows = [make_row(lens, rng, VOCAB) for lens in TWO_ROWS]
    batch = collate(rows, pad_to_multiple_of=16, position_span=64)
    assert (batch["position_ids"].diff(dim=1) > 1).any()  # some sample really skips
    set_attention(model, backend)
    trainable = unavailable_reason(backend, "cpu", needs_grad=True) is None
    error = max_packing_error(model, batch, with_grads=trainable)
    assert error.logits <= TOLERANCE
    if trainable:
        assert error.grads <= TOLERANCE
    # The positions matter: the same rows with contiguous positions give other logits.
    set_attention(model, "sdpa_mask")
    with torch.no_grad():
        skipped = model(**batch).logits
        contiguous = model(**collate(rows, pad_to_multiple_of=16)).logits
    assert (skipped - contiguous).abs().max() > 1e-3


def test_check_packing_cli_takes_a_position_span_and_refuses_a_bad_one(
    tmp_path, monkeypatch
) -> None:
    from typer.testing import CliRunner

    from longdata.cli import app
    from longdata.trainer import check
    from tests.builders import two_bucket_build

    spans = []

    def recording_collate(rows, pad_to_multiple_of=None, position_span=None, **options):
        spans.append(position_span)
        return collate(rows, pad_to_multiple_of, position_span, **options)

    monkeypatch.setattr(check, "collate", recording_collate)
    build = two_bucket_build(tmp_path / "build", VOCAB, (10, 40), 80)
    common = ["check-packing", str(build), "--rows", "2"]
    done = CliRunner().invoke(app, [*common, "--position-span", "4096"])
    assert done.exit_code == 0, done.output
    assert "sdpa_varlen" in done.output
    assert spans == [4096]  # the rows checked are collated with PoSE positions
    refused = CliRunner().invoke(app, [*common, "--position-span", "1"])
    assert refused.exit_code != 0 and "position_span must be >= 2" in refused.output
    assert "Traceback" not in refused.output
