"""THE invariant: packed samples give the logits and gradients they give alone."""

import warnings

import numpy as np
import pytest
import torch

from longdata.trainer import collate, load_model
from longdata.trainer.attention import (
    BACKENDS,
    available_backends,
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
