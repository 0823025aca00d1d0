"""The packing invariant: a packed sample behaves exactly as if it were alone.

For every sample of a packed batch, its logits must equal those of running the sample alone
through the same model with stock attention, and the gradients of the summed per-sample
losses must equal the gradients of the same losses computed sample by sample. Used by the tests
and by `longdata check-packing` on real rows.

"Equal" cannot mean "within a fixed absolute tolerance": packed and alone add the same numbers
in a different order, so they differ by rounding, and rounding grows with the row (a gradient
sums over every target token of the row). `check_backends` therefore also runs every sample
alone in float64 and holds the packed error to the rounding of the same computation:

    max |packed - alone64|  <=  ROUNDING_FACTOR * max |alone - alone64|  +  eps * max |alone64|

where `alone` is the sample alone at the backend's own precision (fp32 with stock attention;
the bf16 varlen kernels alone, for them) and eps that precision's machine epsilon. A correct
backend's packed result is another rounding of the same sum, so its error is the same size as
the alone run's; a sample that sees another sample's tokens is off by the attention weights it
gave them, orders of magnitude above rounding at every length.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import PretrainedConfig, PreTrainedModel

from longdata.format import Manifest
from longdata.trainer.attention import (
    BACKENDS,
    available_backends,
    implementation_name,
    shifted_sparse_inputs,
    unavailable_reason,
)
from longdata.trainer.collation import collate
from longdata.trainer.config import DEFAULT_LOSS_CHUNK_TOKENS, ConfigError, TrainConfig
from longdata.trainer.loss import TokenLosses, model_token_losses
from longdata.trainer.model import set_attention
from longdata.trainer.planner import GIB
from longdata.trainer.step import micro_step

# The reference runs every sample alone with transformers' stock sdpa and no mask: the plain
# causal kernel, which on CPU is a flash-style loop that never holds a [L, L] score matrix
# (stock eager attention would hold [heads, L, L] per layer, 1 GiB for one 8K-token sample).
REFERENCE_ATTENTION = "sdpa"
ALONE_KEYS = ("input_ids", "labels", "position_ids", "sample_ids", "source_ids")
# flash-attn and torch's varlen kernels compute in bf16 even for an fp32 model.
HALF_PRECISION = ("flash_attn", "torch_varlen")
# How many times the alone run's own rounding error a packed result may be off. Measured on
# tiny-llama and tiny-qwen2 (docs/BENCHMARKS.md): correct backends stay within 1.8x of it from
# 256 to 8K tokens; a sample seeing the previous one is off by over 100x the bound
# (tests/test_check_packing.py).
ROUNDING_FACTOR = 8.0
# Bytes per (query, key) pair of one row that a packed check holds on the host, measured with
# /usr/bin/time -v on tiny-llama (docs/BENCHMARKS.md). SDPA's CPU kernel runs sdpa_mask's
# additive fp32 [T, T] mask inside its flash loop (no score matrix): the mask and the boolean
# masks it is built from remain; shifted sparse adds a boolean mask per head and its temporaries.
# Uncompiled FlexAttention (CPU, forward only) materialises several fp32 [heads, T, T] scores.
SDPA_MASK_BYTES_PER_PAIR = 7
S2_MASK_BYTES_PER_PAIR = 32
FLEX_SCORE_COPIES = 4


class CheckError(ConfigError):
    """check-packing cannot run as asked (no row short enough, not enough memory): one line."""


@dataclass(frozen=True)
class PackingError:
    """Largest absolute differences between packed and one-sample-at-a-time results."""

    logits: float
    grads: float | None  # None when the backward pass was not checked


@dataclass(frozen=True)
class Difference:
    """One quantity (logits or gradients) of a backend: its packed error, measured against the
    float64 alone result, and the rounding error of the same computation alone."""

    error: float  # max |packed - alone64|
    rounding: float  # max |alone - alone64|, alone at the backend's precision
    scale: float  # max |alone64|
    eps: float  # machine epsilon of the backend's precision

    @property
    def bound(self) -> float:
        return ROUNDING_FACTOR * self.rounding + self.eps * self.scale

    @property
    def ok(self) -> bool:
        return self.error <= self.bound

    def describe(self) -> str:
        return f"{self.error:.2e} (bound {self.bound:.2e}, rounding {self.rounding:.2e})"


@dataclass(frozen=True)
class Verdict:
    """One backend's result: logits always, gradients where it has a backward pass here."""

    backend: str
    logits: Difference
    grads: Difference | None

    @property
    def ok(self) -> bool:
        return self.logits.ok and (self.grads is None or self.grads.ok)

    def line(self) -> str:
        grads = "not checked (no backward)" if self.grads is None else self.grads.describe()
        word = "ok" if self.ok else "FAILED"
        return f"{self.backend:>13}: {word:<6} logits {self.logits.describe()}, grads {grads}"


@dataclass(frozen=True)
class CheckReport:
    """What `check_packing` found: the rows checked and a verdict or skip reason per backend."""

    row_tokens: list[int]
    samples_per_row: list[int]
    verdicts: dict[str, Verdict]
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def failed(self) -> list[str]:
        return [name for name, verdict in self.verdicts.items() if not verdict.ok]

    def lines(self) -> list[str]:
        lines = [
            f"{len(self.row_tokens)} rows of {self.row_tokens} tokens, samples per row "
            f"{self.samples_per_row}; bound = {ROUNDING_FACTOR:g} x the rounding error of the "
            "sample alone (vs float64) + eps x max |value|"
        ]
        lines += [f"{name:>13}: skipped ({reason})" for name, reason in self.skipped.items()]
        lines += [verdict.line() for verdict in self.verdicts.values()]
        passed = len(self.verdicts) - len(self.failed)
        summary = f"{passed} backends ok, {len(self.failed)} failed, {len(self.skipped)} skipped"
        if self.failed:
            summary += f": FAILED {', '.join(self.failed)}"
        lines.append(summary)
        return lines


@dataclass
class _Run:
    """One way of computing every sample: its final hidden states (sample order of
    `_alone_batches`), the summed gradients, and the output layer that turns them into logits."""

    hidden: list[torch.Tensor]
    grads: list[torch.Tensor] | None
    output_layer: torch.nn.Module


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


def _alone_inputs(
    alone: Mapping[str, torch.Tensor], s2_group: float | None, backend: str | None
) -> tuple[str, dict]:
    """How one sample alone is run: (attention implementation, decoder inputs).

    Stock attention (full) by default. Under shifted sparse, or for a `backend` that must be
    run alone (the bf16 kernels: the rounding of their own computation), the backend with
    packing metadata of one segment; shifted sparse runs the per-group SDPA loop (stock
    attention knows no groups).
    """
    # Its own positions: 0..L-1, or the PoSE positions collate drew from its tokens alone.
    sample = {"input_ids": alone["input_ids"], "position_ids": alone["position_ids"]}
    if s2_group is None and backend is None:
        # The explicit all-ones mask: without one, transformers reads a jump in position_ids
        # (a PoSE skip) as the start of another packed sequence.
        mask = torch.ones_like(alone["input_ids"])
        return REFERENCE_ATTENTION, {**sample, "attention_mask": mask, "use_cache": False}
    length = alone["input_ids"].shape[1]
    device = alone["input_ids"].device
    metadata = {
        "cu_seqlens": torch.tensor([0, length], dtype=torch.int32, device=device),
        "max_seqlen": length,
        "document_ids": torch.zeros(1, length, dtype=torch.int32, device=device),
    }
    inputs = {**sample, "use_cache": False, **metadata}
    if s2_group is not None:
        inputs.update(shifted_sparse_inputs(metadata, s2_group))
    return implementation_name(backend or "sdpa_varlen"), inputs


def _summed_loss_backward(
    model: PreTrainedModel, batch: Mapping[str, Any], inputs: Mapping[str, Any]
) -> None:
    """Back-propagate the sum of `batch`'s target-token losses (a token mean over 1)."""

    def scorer(scored: Mapping[str, Any]) -> TokenLosses:
        return model_token_losses(model, scored, DEFAULT_LOSS_CHUNK_TOKENS, inputs=inputs)

    micro_step(scorer, batch, "token_mean", denominator=1)


@contextlib.contextmanager
def _comparing(model: PreTrainedModel) -> Iterator[None]:
    """Run `model` deterministically (eval: no dropout) with clean gradients, and put its
    mode, attention and gradients back afterwards."""
    was_training = model.training
    implementation = model.config._attn_implementation
    model.eval()
    model.zero_grad(set_to_none=True)
    try:
        yield
    finally:
        model.zero_grad(set_to_none=True)
        model.set_attn_implementation(implementation)
        model.train(was_training)


def _packed_run(
    model: PreTrainedModel,
    batch: Mapping[str, torch.Tensor | int],
    packed_inputs: Mapping[str, torch.Tensor | int],
    with_grads: bool,
) -> _Run:
    """The batch packed, as the model's attention runs it; hidden states without gradients,
    then the gradients from the training micro-step (tiled loss), so memory stays that of one
    training step on the batch."""
    with _comparing(model):
        with torch.no_grad():
            hidden = model.get_decoder()(**packed_inputs).last_hidden_state
        grads = None
        if with_grads:
            _summed_loss_backward(model, batch, packed_inputs)
            grads = _gradients(model)
    samples = [hidden[row, span] for row, span, _ in _alone_batches(batch)]
    return _Run(samples, grads, model.get_output_embeddings())


def _alone_run(
    model: PreTrainedModel,
    batch: Mapping[str, torch.Tensor | int],
    with_grads: bool,
    s2_group: float | None,
    backend: str | None = None,
) -> _Run:
    """Every sample run on its own (see `_alone_inputs`); gradients accumulate over samples,
    one sample's graph at a time."""
    hidden = []
    with _comparing(model):
        for _, _, alone in _alone_batches(batch):
            implementation, inputs = _alone_inputs(alone, s2_group, backend)
            model.set_attn_implementation(implementation)
            with torch.no_grad():
                hidden.append(model.get_decoder()(**inputs).last_hidden_state[0])
            if with_grads:
                _summed_loss_backward(model, alone, inputs)
        grads = _gradients(model) if with_grads else None
    return _Run(hidden, grads, model.get_output_embeddings())


@torch.no_grad()
def _logit_pairs(run: _Run, other: _Run) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The two runs' logits of every sample in float64, chunk by chunk (never a whole
    sample's [L, vocab] at once)."""
    for mine, theirs in zip(run.hidden, other.hidden, strict=True):
        for a, b in zip(
            mine.split(DEFAULT_LOSS_CHUNK_TOKENS),
            theirs.split(DEFAULT_LOSS_CHUNK_TOKENS),
            strict=True,
        ):
            yield run.output_layer(a).double(), other.output_layer(b).double()


def _max_abs_difference(pairs: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> float:
    return max((float((a - b).abs().max()) for a, b in pairs), default=0.0)


def max_packing_error(
    model: PreTrainedModel,
    batch: Mapping[str, torch.Tensor | int],
    packed_inputs: Mapping[str, torch.Tensor | int] | None = None,
    with_grads: bool = True,
    s2_group: float | None = None,
) -> PackingError:
    """Largest absolute differences between the model on `batch` (fed as `packed_inputs`,
    default all of it) and each sample alone, at the model's precision.

    The model runs packed with whatever attention it has; the reference runs every sample of
    every row on its own, with stock attention and no packing metadata. With `s2_group`,
    packed and alone both run shifted sparse attention with that group size. For short rows
    in the tests; real rows get `check_backends`'s rounding-relative verdicts.
    """
    packed_inputs = _packed_inputs(batch, packed_inputs, s2_group)
    packed = _packed_run(model, batch, packed_inputs, with_grads)
    alone = _alone_run(model, batch, with_grads, s2_group)
    grads = None
    if with_grads:
        grads = _max_abs_difference(zip(packed.grads, alone.grads, strict=True))
    return PackingError(logits=_max_abs_difference(_logit_pairs(packed, alone)), grads=grads)


def _packed_inputs(
    batch: Mapping[str, torch.Tensor | int],
    packed_inputs: Mapping[str, torch.Tensor | int] | None,
    s2_group: float | None,
) -> Mapping[str, torch.Tensor | int]:
    if packed_inputs is None:
        packed_inputs = {key: value for key, value in batch.items() if key != "labels"}
    if s2_group is not None:
        packed_inputs = {**packed_inputs, **shifted_sparse_inputs(batch, s2_group)}
    return packed_inputs


def _difference(
    pairs: Iterator[tuple[torch.Tensor, torch.Tensor]],
    rounding_pairs: Iterator[tuple[torch.Tensor, torch.Tensor]],
    eps: float,
) -> Difference:
    """`pairs` are (packed, alone64), `rounding_pairs` (alone, alone64), in the same order."""
    error = rounding = scale = 0.0
    for (packed, exact), (alone, _) in zip(pairs, rounding_pairs, strict=True):
        exact = exact.double()
        error = max(error, float((packed.double() - exact).abs().max()))
        rounding = max(rounding, float((alone.double() - exact).abs().max()))
        scale = max(scale, float(exact.abs().max()))
    return Difference(error=error, rounding=rounding, scale=scale, eps=eps)


def _verdict(backend: str, packed: _Run, alone: _Run, exact: _Run, eps: float) -> Verdict:
    logits = _difference(_logit_pairs(packed, exact), _logit_pairs(alone, exact), eps)
    grads = None
    if packed.grads is not None:
        grads = _difference(
            zip(packed.grads, exact.grads, strict=True),
            zip(alone.grads, exact.grads, strict=True),
            eps,
        )
    return Verdict(backend, logits, grads)


def check_backends(
    model: PreTrainedModel,
    rows: Sequence[Mapping[str, np.ndarray]],
    pad_to_multiple_of: int | None = None,
    backends: Sequence[str] | None = None,
    s2_group: float | None = None,
    position_span: int | None = None,
) -> dict[str, Verdict | str]:
    """A verdict for every backend (default: all available), or why it cannot run here;
    `position_span` collates the rows with PoSE positions, as training does.

    Every sample is run alone three ways at most once each: at the model's precision with
    stock attention, in float64 (a copy of the model), and, for a bf16 backend, with that
    backend (see the module docstring for the rule).
    """
    device = next(model.parameters()).device
    batch = {
        key: value.to(device) if isinstance(value, torch.Tensor) else value
        for key, value in collate(rows, pad_to_multiple_of, position_span).items()
    }
    runnable = {}
    results: dict[str, Verdict | str] = {}
    for backend in backends or available_backends(device, needs_grad=False):
        reason = unavailable_reason(backend, device, needs_grad=False)
        if reason:
            results[backend] = reason
        else:
            runnable[backend] = unavailable_reason(backend, device, needs_grad=True) is None
    if not runnable:
        return results
    with_grads = any(runnable.values())
    exact = _alone_run(_float64_copy(model), batch, with_grads, s2_group)
    alone = _alone_run(model, batch, with_grads, s2_group)
    original_implementation = model.config._attn_implementation
    try:
        for backend, trainable in runnable.items():
            half = backend in HALF_PRECISION
            rounding = _alone_run(model, batch, trainable, s2_group, backend) if half else alone
            set_attention(model, backend)
            packed_inputs = _packed_inputs(batch, None, s2_group)
            packed = _packed_run(model, batch, packed_inputs, trainable)
            eps = torch.finfo(torch.bfloat16 if half else model.dtype).eps
            results[backend] = _verdict(backend, packed, rounding, exact, eps)
    finally:
        model.set_attn_implementation(original_implementation)
    return results


def _float64_copy(model: PreTrainedModel) -> PreTrainedModel:
    """The model in float64, with stock attention for the alone runs."""
    exact = copy.deepcopy(model).to(torch.float64)
    exact.set_attn_implementation(REFERENCE_ATTENTION)
    return exact


def select_rows(
    manifest: Manifest, split: str, rows: int, max_tokens: int
) -> list[dict[str, np.ndarray]]:
    """The first `rows` rows of `split` (stream order) no longer than `max_tokens`."""
    from longdata.trainer.data import make_dataset

    dataset = make_dataset(manifest, split, batch_size=1, shuffle=False)
    picked = []
    for index in range(dataset.num_samples):
        if len(picked) == rows:
            break
        row = dataset[index]
        if len(row["input_ids"]) <= max_tokens:
            picked.append(row)
    if not picked:
        raise CheckError(f"no row of split {split!r} has <= {max_tokens} tokens")
    return picked


def available_memory(device: torch.device | str) -> int:
    """Bytes a new allocation can take now: free device memory on CUDA; on the host, the
    kernel's MemAvailable (free plus reclaimable cache), or free pages where it has none."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _square_bytes_per_pair(
    backend: str, heads: int, device: torch.device, shifted_sparse: bool
) -> int:
    """Bytes per (query, key) pair of a row that `backend` holds during the packed forward."""
    if backend == "sdpa_mask":
        return SDPA_MASK_BYTES_PER_PAIR + (S2_MASK_BYTES_PER_PAIR if shifted_sparse else 0)
    if backend == "flex" and device.type != "cuda":
        return FLEX_SCORE_COPIES * 4 * heads
    return 0  # varlen kernels, and flex compiled with a block mask: linear in the row


def check_memory_bytes(
    config: PretrainedConfig,
    row_tokens: Sequence[int],
    longest_sample: int,
    backends: Sequence[str],
    device: torch.device | str,
    shifted_sparse: bool = False,
) -> int:
    """Estimated peak memory of `check_backends` on rows of `row_tokens` (padded to the
    longest), for an fp32 model of `config`, beyond what the process holds before the model
    is loaded.

    The fp32 model, its float64 copy and four gradient sets (packed, alone, alone in float64
    at twice the bytes), plus the larger of two moments: a training step on the packed batch
    (trainer.planner's estimate without weights, gradients and optimizer) with the masks or
    scores of the hungriest backend, and the float64 step of the longest sample alone.
    """
    from longdata.trainer.planner import ModelDims, StepShape, plan_memory

    device = torch.device(device)
    dims = ModelDims.of(config)

    def step_bytes(tokens: int) -> int:
        # What check_backends runs: an fp32 model, every weight trained, the loss tiled.
        checked = TrainConfig(precision="fp32", weights="fp32", lora=False, tiled_loss=True)
        shape = StepShape.from_config(checked, row_tokens=tokens)
        plan = plan_memory(config, shape)
        fixed = plan.parts["weights"] + plan.parts["optimizer"] + plan.parts["gradients"]
        return plan.peak_bytes - fixed

    rows, length = len(row_tokens), max(row_tokens)
    per_pair = max(
        (_square_bytes_per_pair(name, dims.heads, device, shifted_sparse) for name in backends),
        default=0,
    )
    packed = rows * (step_bytes(length) + per_pair * length**2)
    exact = 2 * step_bytes(longest_sample)
    parameters = dims.parameters() * 4
    return 3 * parameters + 5 * parameters + max(packed, exact)


def check_packing(
    manifest: Manifest,
    *,
    model: str = "tiny-llama",
    split: str = "train",
    rows: int = 2,
    max_tokens: int = 4096,
    seed: int = 0,
    s2_group: float | None = None,
    position_span: int | None = None,
    backends: Sequence[str] = BACKENDS,
) -> CheckReport:
    """Check the packing invariant on the first `rows` rows of a build's `split` no longer
    than `max_tokens`, batched together (so batch boundaries are checked too), for every
    backend of `backends` that runs here; `s2_group` for shifted sparse attention,
    `position_span` for PoSE positions.

    Refuses (CheckError, one line) before loading the model when the check would not fit the
    memory available here.
    """
    from longdata.trainer.model import load_model, model_config

    picked = select_rows(manifest, split, rows, max_tokens)
    row_tokens = [len(row["input_ids"]) for row in picked]
    longest_sample = max(int(row["seq_lens"].max()) for row in picked)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = model_config(model, manifest.vocab_size)
    shifted_sparse = s2_group is not None
    needed = check_memory_bytes(
        config, row_tokens, longest_sample, backends, device, shifted_sparse
    )
    available = available_memory(device)
    if needed > available:
        fits = _longest_fitting_row(
            config, len(picked), backends, device, shifted_sparse, available
        )
        raise CheckError(
            f"{_rows_phrase(row_tokens)} needs ~{needed / GIB:.1f} GiB here, "
            f"{available / GIB:.1f} GiB available; pass --max-tokens {fits} or less"
            + (" or fewer --rows" if len(picked) > 1 else "")
        )
    lm = load_model(model, "sdpa_mask", vocab_size=manifest.vocab_size, device=device, seed=seed)
    results = check_backends(
        lm, picked, backends=backends, s2_group=s2_group, position_span=position_span
    )
    return CheckReport(
        row_tokens=row_tokens,
        samples_per_row=[len(row["seq_lens"]) for row in picked],
        verdicts={name: result for name, result in results.items() if isinstance(result, Verdict)},
        skipped={name: result for name, result in results.items() if isinstance(result, str)},
    )


def _rows_phrase(row_tokens: Sequence[int]) -> str:
    if len(row_tokens) == 1:
        return f"a row of {row_tokens[0]:,} tokens"
    return f"{len(row_tokens)} rows of up to {max(row_tokens):,} tokens"


def _longest_fitting_row(
    config: PretrainedConfig,
    rows: int,
    backends: Sequence[str],
    device: torch.device,
    shifted_sparse: bool,
    available: int,
    multiple_of: int = 256,
) -> int:
    """The longest row length (a multiple of `multiple_of`, 0 if none) whose check fits
    `available`, every row that long and one sample long (the worst case)."""

    def fits(length: int) -> bool:
        needed = check_memory_bytes(
            config, [length] * rows, length, backends, device, shifted_sparse
        )
        return needed <= available

    low, high = 0, multiple_of
    while fits(high):
        low, high = high, high * 2
    while high - low > multiple_of:
        middle = (low + high) // 2 // multiple_of * multiple_of
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low
