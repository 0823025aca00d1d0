"""check-packing's verdicts: relative to rounding, failing on a leak, bounded in memory."""

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from longdata.cli import app
from longdata.trainer import attention, check, collate
from longdata.trainer.attention import available_backends, document_causal_additive_mask
from longdata.trainer.check import check_backends, check_memory_bytes, max_packing_error
from longdata.trainer.model import load_model, model_config, set_attention
from tests.builders import make_row, write_build

VOCAB = 512
CPU_BACKENDS = available_backends("cpu", needs_grad=False)
OLD_ABSOLUTE_TOLERANCE = 1e-4  # what check-packing held every fp32 backend to before


@pytest.fixture(autouse=True)
def _quiet_flex() -> None:
    # Eager (uncompiled) flex on CPU warns that it is unfused; that is expected here.
    warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")


def _rows(lengths: list[list[int]], seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [make_row(row, rng, VOCAB) for row in lengths]


def _leaking_mask(document_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The block-diagonal causal mask, except that every sample also sees the sample before
    it in its row: the bug a packing backend must never have."""
    allowed = document_causal_additive_mask(document_ids, dtype) == 0
    previous = document_ids[:, :, None] - 1 == document_ids[:, None, :]
    allowed |= previous[:, None]
    mask = torch.zeros(allowed.shape, dtype=dtype)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


def test_verdicts_pass_where_the_fixed_absolute_tolerance_fails() -> None:
    # Rounding grows with the size of what is summed: on an 8K row of tiny-llama the gradient
    # rounding passes 1e-4. A larger init makes the same happen at 512 tokens, cheaply, by a
    # margin (~8x here) that does not hang on one CPU's rounding: at 256 tokens it was 1.1x on
    # one machine and 0.9x on another.
    config = model_config("tiny-llama", VOCAB)
    config.initializer_range = 0.3
    model = load_model(config, "sdpa_mask", seed=0)
    rows = _rows([[128, 256, 128]])

    old = max_packing_error(model, collate(rows))
    assert old.grads > OLD_ABSOLUTE_TOLERANCE  # the old rule would call a correct backend broken

    verdicts = check_backends(model, rows, backends=CPU_BACKENDS)
    assert set(verdicts) == set(CPU_BACKENDS)
    for verdict in verdicts.values():
        assert verdict.ok, verdict.line()
        assert verdict.logits.rounding > 0 and verdict.logits.error <= verdict.logits.bound
        assert "ok" in verdict.line() and "FAILED" not in verdict.line()
    assert verdicts["sdpa_mask"].grads.error > OLD_ABSOLUTE_TOLERANCE
    assert verdicts["flex"].grads is None  # no backward on CPU: logits only


def test_a_sample_seeing_the_previous_one_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    model = load_model("tiny-llama", "sdpa_mask", vocab_size=VOCAB, seed=0)
    rows = _rows([[40, 200, 16], [128, 128]])
    monkeypatch.setattr(attention, "_dense_mask", _leaking_mask)
    verdicts = check_backends(model, rows, backends=["sdpa_mask", "sdpa_varlen"])
    leaked = verdicts["sdpa_mask"]
    assert not leaked.ok and "FAILED" in leaked.line()
    assert leaked.logits.error > 100 * leaked.logits.bound
    assert leaked.grads.error > 100 * leaked.grads.bound
    assert verdicts["sdpa_varlen"].ok  # the same run's correct backend still passes


def test_the_estimate_counts_what_grows_with_the_square_of_the_row() -> None:
    config = model_config("tiny-llama", 16_384)
    pairs = 16_384**2

    def estimate(backends: list[str], device: str = "cpu", rows: int = 1) -> int:
        return check_memory_bytes(config, [16_384] * rows, 1024, backends, device)

    varlen = estimate(["sdpa_varlen"])
    assert estimate(["sdpa_varlen", "sdpa_mask"]) - varlen == 7 * pairs  # mask, no scores
    # Uncompiled flex (CPU) holds fp32 [heads, T, T] scores; compiled (CUDA) it does not.
    assert estimate(["sdpa_varlen", "flex"]) - varlen == 4 * 4 * 4 * pairs
    assert estimate(["sdpa_varlen", "flex"], "cuda") == varlen
    assert estimate(["flex"], rows=2) > 1.9 * estimate(["flex"])


def _build(tmp_path: Path, lengths: list[list[int]]) -> Path:
    return write_build(tmp_path / "build", {"le_0512": _rows(lengths)}, VOCAB, 512)


def _invoke(*args: object):
    return CliRunner().invoke(app, ["check-packing", *map(str, args)])


def test_cli_prints_a_verdict_per_backend_and_exits_by_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    build = _build(tmp_path, [[30, 60, 10], [50, 50]])
    passed = _invoke(build, "--rows", "2")
    assert passed.exit_code == 0, passed.output
    for backend in CPU_BACKENDS:
        assert f"{backend}: ok" in passed.output
    assert "flash_attn: skipped" in passed.output
    assert passed.output.rstrip().splitlines()[-1].startswith(f"{len(CPU_BACKENDS)} backends ok")

    monkeypatch.setattr(attention, "_dense_mask", _leaking_mask)
    failed = _invoke(build, "--rows", "2")
    assert failed.exit_code == 1, failed.output
    assert "sdpa_mask: FAILED" in failed.output and "sdpa_varlen: ok" in failed.output
    assert failed.output.rstrip().splitlines()[-1].endswith("FAILED sdpa_mask")
    assert "Traceback" not in failed.output


def _one_line(result, code: int) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == code, result.output
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def test_a_check_that_would_not_fit_is_refused_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    build = _build(tmp_path, [[100, 300]])
    config = model_config("tiny-llama", VOCAB)
    needed = check_memory_bytes(config, [400], 300, attention.BACKENDS, "cpu")
    available = needed - 1
    monkeypatch.setattr(check, "available_memory", lambda device: available)

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded for a check that cannot fit")

    monkeypatch.setattr("longdata.trainer.model.load_model", never)
    line = _one_line(_invoke(build, "--rows", "1", "--max-tokens", "512"), 2)
    assert "a row of 400 tokens needs ~" in line and "GiB available" in line
    suggested = int(line.split("--max-tokens ")[1].split()[0])
    fits = check_memory_bytes(config, [suggested], suggested, attention.BACKENDS, "cpu")
    assert 0 < suggested < 400 and fits <= available


def test_no_row_short_enough_is_one_line(tmp_path: Path) -> None:
    build = _build(tmp_path, [[100, 300]])
    line = _one_line(_invoke(build, "--max-tokens", "64"), 2)
    assert "no row of split 'train' has <= 64 tokens" in line


def test_the_model_is_left_as_it_was() -> None:
    model = load_model("tiny-llama", "sdpa_varlen", vocab_size=VOCAB, seed=0)
    set_attention(model, "sdpa_varlen")
    before = model.config._attn_implementation
    check_backends(model, _rows([[20, 12]]), backends=["sdpa_mask"])
    assert model.config._attn_implementation == before
    assert all(p.grad is None for p in model.parameters())
