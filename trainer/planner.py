"""Memory planner: what one training step of a row needs, part by part, before running it.

`plan_memory` estimates the peak tensor memory of one steady-state training step (optimizer
state already allocated) of this trainer on one device, for a Llama-shaped model config (Llama,
Qwen2, Mistral: GQA attention, gated MLP, RMSNorm), a row length, LoRA or full weights,
precision, Ulysses SP degree and the memory techniques of `trainer.memory`.
`longest_row` searches the longest row that fits a device.

The activation terms count the tensors autograd keeps, per token, as this trainer's models
save them (the residual stream and norms in the weights' dtype, matmul outputs bf16 under bf16
autocast; the lean RMSNorm of `trainer.rms_norm`). tests/test_memory.py holds the estimate within
10% of peaks measured with `PeakTensorMemory` on CPU shapes (techniques x dtypes x depth at 8B
proportions). Not counted: the CUDA context and allocator fragmentation (leave a few GB), and
communication buffers.

The step's peak is the largest of its moments: the loss (all kept activations, the final norm's
and the targets' hidden states, one chunk of logits), one layer's backward (kept activations,
every gradient, and the layer's recomputed activations with their gradients, the largest of its
MLP's backward, its attention's backward and, checkpointed, the recomputed attention block at
its output projection), and AdamW's step.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from longdata.trainer.config import (
    ATTENTION_PATTERNS,
    ConfigError,
    TrainConfig,
    resolved_precision,
    resolved_weights,
)

if TYPE_CHECKING:
    from transformers import PretrainedConfig

GIB = 2**30
FP32 = 4
# Per logit element while a chunk is scored: logits, log-softmax and their gradient, fp32 (under
# bf16 autocast the bf16 logits are upcast). Measured with PeakTensorMemory (tests/test_memory.py).
LOSS_BYTES_PER_LOGIT = {"fp32": 12, "bf16": 11}
# AdamW's foreach step allocates about one fp32 temporary per trainable weight (the
# denominator sqrt(v) + eps; measured 0.75x, torch 2.14). The 4x used before counted its in-place
# results as allocations (PeakTensorMemory counted storage shared with inputs).
OPTIMIZER_STEP_TEMPORARIES = 1
WEIGHT_DTYPES = ("fp32", "bf16", "fp8")
FP8_SCALE = 4  # one fp32 scale per output channel of each frozen linear (trainer/fp8.py)


def llama_8b_config() -> PretrainedConfig:
    """The shape of Llama-3.1-8B (no weights: for planning and GPU benchmarks)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128_256,
        hidden_size=4096,
        intermediate_size=14_336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131_072,
        rope_theta=500_000.0,
        tie_word_embeddings=False,
    )


PLANNER_PRESETS = {"llama-3.1-8b": llama_8b_config}


def planner_config(name_or_path: str) -> PretrainedConfig:
    """A planner preset, a trainer preset (tiny-llama, ...), or a local config.json / checkpoint
    directory."""
    if name_or_path in PLANNER_PRESETS:
        return PLANNER_PRESETS[name_or_path]()
    from longdata.trainer.model import model_config

    return model_config(name_or_path)


# The training settings a step's memory depends on: `StepShape.from_config` reads them from a
# `TrainConfig`, and `longdata plan-memory` offers them as options generated from its fields.
PLANNED_SETTINGS = (
    "lora",
    "lora_rank",
    "lora_targets",
    "precision",
    "weights",
    "sp",
    "attention",
    "attention_pattern",
    "s2_group",
    "gradient_checkpointing",
    "tiled_loss",
    "loss_chunk_tokens",
    "tiled_mlp",
    "mlp_chunk_tokens",
    "offload_activations",
    "offload_layers",
)
# Backends that compute a whole [T, T] score matrix per head (the others tile it away).
DENSE_ATTENTION = ("sdpa_mask",)


@dataclass(frozen=True)
class StepShape:
    """What is trained: the row, the weights that learn, and how the step is run.

    No field has a default: build it with `from_config`, so that every default is
    `TrainConfig`'s. `precision` and `weights` are resolved (never `auto`).
    """

    row_tokens: int
    target_tokens: int | None  # None: every token is a target
    lora: bool
    lora_rank: int
    lora_targets: tuple[str, ...]
    precision: str  # fp32, or bf16 autocast
    # What longdata train loads: bf16 halves weights and residual stream; fp8 (LoRA) stores the
    # decoder's frozen linears in one byte plus a scale per output channel, the rest bf16.
    weights: str
    sp: int
    attention: str  # a backend of trainer.attention, or auto (the best: a varlen kernel)
    attention_pattern: str
    s2_group: float
    gradient_checkpointing: bool
    tiled_loss: bool
    loss_chunk_tokens: int
    tiled_mlp: bool
    mlp_chunk_tokens: int
    offload_activations: bool
    offload_layers: int | None  # with offload: the first k layers' checkpoints (None: all)

    @classmethod
    def from_config(
        cls, config: TrainConfig, row_tokens: int, target_tokens: int | None = None
    ) -> StepShape:
        """The step `config` runs on one row of `row_tokens` tokens (`target_tokens` of them
        targets; None: all) on a bf16-capable GPU, where `auto` precision and weights resolve as
        the trainer resolves them there."""
        settings = {name: getattr(config, name) for name in PLANNED_SETTINGS}
        settings["lora_targets"] = tuple(config.lora_targets)
        settings["precision"] = resolved_precision(config.precision, bf16_device=True)
        settings["weights"] = resolved_weights(config.weights, config.lora, bf16_device=True)
        return cls(row_tokens=row_tokens, target_tokens=target_tokens, **settings)

    def __post_init__(self) -> None:
        from longdata.trainer.attention import BACKENDS

        if self.precision not in LOSS_BYTES_PER_LOGIT:
            raise ConfigError(f"precision must be fp32 or bf16, not {self.precision!r}")
        if self.weights not in WEIGHT_DTYPES:
            raise ConfigError(f"weights must be one of {WEIGHT_DTYPES}, not {self.weights!r}")
        if self.weights == "fp8" and not self.lora:
            raise ConfigError("weights fp8 needs lora (only frozen linears are stored in fp8)")
        if self.attention not in ("auto", *BACKENDS):
            raise ConfigError(
                f"attention must be auto or one of {', '.join(BACKENDS)}, not {self.attention!r}"
            )
        if self.attention_pattern not in ATTENTION_PATTERNS:
            raise ConfigError(
                f"attention_pattern must be one of {', '.join(ATTENTION_PATTERNS)}, "
                f"not {self.attention_pattern!r}"
            )
        if self.offload_activations and not self.gradient_checkpointing:
            raise ConfigError("offload_activations needs gradient_checkpointing")
        if self.offload_layers is not None and (
            not self.offload_activations or self.offload_layers < 0
        ):
            raise ConfigError("offload_layers needs offload_activations and must be >= 0")
        if min(self.row_tokens, self.sp, self.loss_chunk_tokens, self.mlp_chunk_tokens) < 1:
            raise ConfigError("row_tokens, sp and chunk sizes must be >= 1")


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per part on one device (`parts`), their peak combination, host memory, and the
    step's attention FLOPs under full attention and under the shape's pattern."""

    parts: dict[str, int]
    peak_bytes: int
    host_bytes: int  # offloaded hidden states
    attention_flops: dict[str, float]  # "full", and "shifted_sparse" under that pattern
    shape: StepShape = field(repr=False)

    def table(self) -> str:
        lines = ["| part | GiB |", "|---|---:|"]
        lines += [f"| {name} | {size / GIB:,.2f} |" for name, size in self.parts.items()]
        lines.append(f"| **peak** | **{self.peak_bytes / GIB:,.2f}** |")
        if self.host_bytes:
            lines.append(f"| host (offloaded) | {self.host_bytes / GIB:,.2f} |")
        lines.append("")
        lines.append("| attention (forward + backward, whole row) | TFLOPs |")
        lines.append("|---|---:|")
        lines += [
            f"| {pattern} | {flops / 1e12:,.1f} |"
            for pattern, flops in self.attention_flops.items()
        ]
        return "\n".join(lines)


def squared_attention_lengths(shape: StepShape) -> dict[str, int]:
    """Sum of squared attention spans of the shape's row (one sample): the row's length squared
    under full attention; under shifted sparse attention, the squared group lengths averaged over
    the two head halves, grouped as `trainer.attention.shifted_sparse_inputs` groups a sample."""
    from longdata.trainer.attention import segment_group_size

    length = shape.row_tokens
    squares = {"full": length**2}
    if shape.attention_pattern == "shifted_sparse":
        size = segment_group_size(length, shape.s2_group)
        shift = size // 2 if size < length else 0
        halves = 0
        for offset in (0, shift):
            # Positions p in [offset, length + offset) fall in groups p // size.
            end = length + offset
            edges = [offset, *range(offset // size * size + size, end, size), end]
            halves += sum((high - low) ** 2 for low, high in itertools.pairwise(edges))
        squares["shifted_sparse"] = halves // 2
    return squares


@dataclass(frozen=True)
class ModelDims:
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    q_width: int
    kv_width: int
    heads: int
    tied: bool
    qkv_bias: bool

    @classmethod
    def of(cls, config: PretrainedConfig) -> ModelDims:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return cls(
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            layers=config.num_hidden_layers,
            vocab=config.vocab_size,
            q_width=heads * head_dim,
            kv_width=kv_heads * head_dim,
            heads=heads,
            tied=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=config.model_type == "qwen2",
        )

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of every projection in one decoder layer, by module name."""
        h, i, q, kv = self.hidden, self.intermediate, self.q_width, self.kv_width
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def parameters(self) -> int:
        per_layer = sum(a * b for a, b in self.linear_shapes().values()) + 2 * self.hidden
        if self.qkv_bias:
            per_layer += self.q_width + 2 * self.kv_width
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * per_layer + embeddings + self.hidden


def weight_bytes_of(d: ModelDims, weights: str) -> int:
    """Bytes of the model's own weights (no adapters) loaded as `weights`."""
    if weights == "fp32":
        return d.parameters() * FP32
    if weights == "bf16":
        return d.parameters() * 2
    linears = d.layers * sum(a * b for a, b in d.linear_shapes().values())
    channels = d.layers * sum(b for _, b in d.linear_shapes().values())
    return (d.parameters() - linears) * 2 + linears + channels * FP8_SCALE


def _saved_linear_inputs(d: ModelDims, shape: StepShape, act: int, stream: int) -> dict[str, int]:
    """Bytes per token the linears of a layer keep of their inputs for backward, per block.

    A linear keeps its input if its weight learns or it carries a LoRA adapter. Where that input
    is cast first (bf16 autocast of an fp32 input; without autocast, peft casting a bf16 input
    to its fp32 adapter), each such linear keeps its own cast copy: q, k and v each keep one of
    the same norm output. Otherwise they share the one input tensor, counted once (under
    autocast the adapters take a bf16 input as it is: `trainer.memory.share_adapter_inputs`).
    The attention output o_proj keeps is its contiguous copy, not the attention's own. Also,
    under "shared attention norm output", the bytes of the attention norm's output counted as
    that one shared input (0 where each keeps a cast), and under "gated product" what
    down_proj keeps (its backward runs first in the MLP's, and frees it).
    """
    autocast = shape.precision == "bf16"
    sources = {  # input: (bytes per element, width, its linears, block)
        "attention norm": (stream, d.hidden, ("q_proj", "k_proj", "v_proj"), "attention"),
        "attention output": (act, d.q_width, ("o_proj",), "attention"),
        "MLP norm": (stream, d.hidden, ("gate_proj", "up_proj"), "mlp"),
        "gated product": (act, d.intermediate, ("down_proj",), "mlp"),
    }
    saved = {"attention": 0, "mlp": 0, "shared attention norm output": 0, "gated product": 0}
    for source, (size, width, linears, block) in sources.items():
        keepers = [name for name in linears if not shape.lora or name in shape.lora_targets]
        if not keepers:
            continue
        if autocast:
            copy = act if size != act else 0
        else:
            copy = FP32 if shape.lora and size != FP32 else 0
        kept = len(keepers) * copy * width if copy else size * width
        saved[block] += kept
        if source == "attention norm" and not copy:
            saved["shared attention norm output"] = kept
        if source == "gated product":
            saved["gated product"] = kept
    return saved


def _output_projection_transients(d: ModelDims, shape: StepShape, act: int) -> int:
    """Bytes per token alive while the attention's output projection runs, beyond what the
    block saves: its input made contiguous from the heads (unless o_proj keeps it), and its
    output; with a LoRA adapter also the adapter's output and its scaled copy (measured at the
    full 8B width with `benchmarks/memory_parts.py`). An input cast for the adapter is not a
    transient: it is what the adapter keeps (`_saved_linear_inputs`)."""
    adapted = shape.lora and "o_proj" in shape.lora_targets
    keeps_input = not shape.lora or adapted
    transients = (0 if keeps_input else act * d.q_width) + act * d.hidden
    return transients + (2 * act * d.hidden if adapted else 0)


def plan_memory(config: PretrainedConfig, shape: StepShape) -> MemoryPlan:
    """Estimate one training step's device memory, part by part (see the module docstring)."""
    d = ModelDims.of(config)
    half_weights = shape.weights != "fp32"
    act = 2 if shape.precision == "bf16" or half_weights else FP32  # matmul outputs
    stream = 2 if half_weights else FP32  # residual stream and norms
    tokens = -(-shape.row_tokens // shape.sp)  # this rank's sequence shard
    targets = tokens if shape.target_tokens is None else -(-shape.target_tokens // shape.sp)

    weight_bytes = FP32 if shape.weights == "fp32" else 2  # of the output layer
    weights = weight_bytes_of(d, shape.weights)
    if shape.lora:
        trainable = d.layers * sum(
            shape.lora_rank * (a + b)
            for name, (a, b) in d.linear_shapes().items()
            if name in shape.lora_targets
        )
    else:
        trainable = d.parameters()
    weights += (trainable if shape.lora else 0) * FP32
    gradients = trainable * FP32
    optimizer = 2 * trainable * FP32  # AdamW's two moments
    # Under bf16 autocast the bf16 copy of every trainable weight is cached for the forward.
    autocast_copies = (
        trainable * 2
        if shape.precision == "bf16" and shape.weights == "fp32" and not shape.lora
        else 0
    )

    # What one layer saves for backward, per token. The two RMSNorms (trainer.rms_norm) keep
    # their input as it is (the first one's is the layer's input: with checkpointing, the kept
    # checkpoint) and a per-token fp32 scale. The attention keeps the rotated q and k, v and its
    # output (and an fp32 log-sum-exp per head); the gated MLP keeps gate, silu(gate) and up. The
    # linears keep their inputs where they learn (`_saved_linear_inputs`).
    saved_inputs = _saved_linear_inputs(d, shape, act, stream)
    attention_saved = stream * d.hidden + 2 * FP32 + FP32 * d.heads
    attention_saved += act * (2 * d.q_width + 2 * d.kv_width) + saved_inputs["attention"]
    layer_input = stream * d.hidden  # kept by the first norm (or as the layer's checkpoint)
    shifted_sparse = shape.attention_pattern == "shifted_sparse"
    dense_attention = shape.attention in DENSE_ATTENTION
    if shifted_sparse and not dense_attention:
        # The varlen path runs each head half over its groups with K and V repeated to every
        # query head (trainer.attention._head_halves): those copies replace K and V.
        attention_saved += act * 2 * (d.q_width - d.kv_width)
    mlp_saved = act * 3 * d.intermediate + saved_inputs["mlp"]
    # Gradients alive while a layer runs backward: of the residual stream, and while the MLP's
    # backward runs, of the gated product and of its two factors.
    residual_grad = stream * d.hidden
    mlp_grads = act * 3 * d.intermediate
    mlp_tokens = min(tokens, shape.mlp_chunk_tokens) if shape.tiled_mlp else tokens
    # The tiled MLP's chunk checkpoints hold its whole input, and its backward a row of the
    # chunks' input gradients by the last chunk (measured: no moment holds their concatenation
    # beside them above the chunk's own working set).
    tiled_input = stream * d.hidden if shape.tiled_mlp else 0

    hidden_state = stream * d.hidden * tokens
    if shape.gradient_checkpointing:
        kept_layers = d.layers * hidden_state  # each layer's input
        # recomputed
        layer_saved = tokens * (attention_saved + tiled_input) + mlp_tokens * mlp_saved
    else:
        kept_layers = d.layers * (
            tokens * (layer_input + attention_saved + tiled_input)
            + (0 if shape.tiled_mlp else tokens * mlp_saved)
        )
        layer_saved = mlp_tokens * mlp_saved if shape.tiled_mlp else 0
    offloaded = 0
    if shape.offload_activations:
        if shape.offload_layers is not None and shape.offload_layers > d.layers:
            raise ConfigError(
                f"offload_layers must be 0..{d.layers} (the model's layers), "
                f"not {shape.offload_layers}"
            )
        offloaded = d.layers if shape.offload_layers is None else shape.offload_layers
    host = kept_layers * offloaded // d.layers
    # Alive through the whole backward: the layers' kept activations and the rotary cos and sin.
    kept = kept_layers - host + 2 * stream * (d.q_width // d.heads) * tokens
    # Alive until the loss's backward is through: the final norm's input and output, and the
    # hidden states of the target positions.
    loss_inputs = 2 * hidden_state + stream * d.hidden * targets
    # A layer's backward starts with its MLP (everything it saved is alive, recomputed if
    # checkpointed); by the attention's backward the MLP's share has been freed.
    mlp_backward = (
        layer_saved
        - mlp_tokens * saved_inputs["gated product"]
        + tokens * residual_grad
        + mlp_tokens * mlp_grads
        + tokens * tiled_input
    )
    attention_backward = (
        tokens * (attention_saved if shape.gradient_checkpointing else 0)
        + 2 * tokens * residual_grad
    )
    layer_working = max(mlp_backward, attention_backward)
    if shape.gradient_checkpointing:
        # The recomputed attention block at its output projection, the residual gradient
        # waiting: the block's saved tensors so far (the attention norm's output in the place of
        # the MLP norm's input, not yet made; counted once where it is the linears' shared saved
        # input), the contiguous attention output and the projection's own outputs.
        recomputed_output_projection = tokens * (
            attention_saved
            - saved_inputs["shared attention norm output"]
            + residual_grad
            + _output_projection_transients(d, shape, act)
        )
        layer_working = max(layer_working, recomputed_output_projection)
    if dense_attention:
        # The additive [T, T] mask in the activations' dtype (SDPA's kernels take it without
        # forming scores); shifted sparse: a boolean [heads, T, T] mask, with which SDPA forms
        # one layer's [heads, T, T] fp32 scores and probabilities.
        whole_row = tokens * shape.sp
        if shifted_sparse:
            attention_workspace = whole_row**2 * (d.heads + 2 * FP32 * d.heads // shape.sp)
        else:
            attention_workspace = whole_row**2 * act
    else:
        attention_workspace = FP32 * d.heads * tokens * 2  # log-sum-exp and its gradient

    chunk = min(targets, shape.loss_chunk_tokens) if shape.tiled_loss else targets
    loss_chunk = chunk * d.vocab * LOSS_BYTES_PER_LOGIT[shape.precision]
    output_layer_grad = 0 if shape.lora else d.vocab * d.hidden * weight_bytes

    fixed = weights + optimizer + autocast_copies
    at_loss = kept + loss_inputs + loss_chunk + output_layer_grad
    at_layer_backward = kept + gradients + layer_working + attention_workspace
    at_optimizer_step = gradients + OPTIMIZER_STEP_TEMPORARIES * trainable * FP32
    parts = {
        "weights": weights,
        "gradients": gradients,
        "optimizer": optimizer,
        "autocast weight copies": autocast_copies,
        "kept activations": kept,
        "loss inputs": loss_inputs,
        "one layer's working set": layer_working,
        "attention workspace": attention_workspace,
        "loss chunk": loss_chunk,
    }
    from longdata.trainer.flops import FlopShape, training_flops

    attention_only = FlopShape(
        body_params=0, head_params=0, layers=d.layers, attention_width=d.q_width
    )
    return MemoryPlan(
        parts=parts,
        peak_bytes=fixed + max(at_loss, at_layer_backward, at_optimizer_step),
        host_bytes=host,
        attention_flops={
            pattern: training_flops(attention_only, 0, 0, squares)
            for pattern, squares in squared_attention_lengths(shape).items()
        },
        shape=shape,
    )


def fit_split(
    config: PretrainedConfig, shape: StepShape, device_bytes: int, host_bytes: int | None = None
) -> MemoryPlan | None:
    """The plan of `shape` that fits the device and the host, or None.

    With offload on, the fewest offloaded layers whose plan fits the device (what stays on the
    device costs no transfers), provided the host holds them; `host_bytes` None: unlimited.
    """
    layers = ModelDims.of(config).layers
    counts = range(layers + 1) if shape.offload_activations else [None]
    for count in counts:
        plan = plan_memory(config, replace(shape, offload_layers=count))
        if plan.host_bytes > (host_bytes if host_bytes is not None else plan.host_bytes):
            return None  # more layers offloaded only need more host memory
        if plan.peak_bytes <= device_bytes:
            return plan
    return None


def fit_row(
    config: PretrainedConfig,
    shape: StepShape,
    device_bytes: int,
    host_bytes: int | None = None,
    multiple_of: int = 1024,
) -> tuple[int, MemoryPlan | None]:
    """The longest row (a multiple of `multiple_of` tokens) whose plan fits `device_bytes` and
    `host_bytes` (None: unlimited), with that plan (its shape's `offload_layers` is the split);
    (0, None) if none does. Targets scale with the row as in `shape` (all, or the same
    fraction)."""

    def plan_at(row_tokens: int) -> MemoryPlan | None:
        targets = None
        if shape.target_tokens is not None:
            targets = max(1, shape.target_tokens * row_tokens // shape.row_tokens)
        trial = replace(shape, row_tokens=row_tokens, target_tokens=targets)
        return fit_split(config, trial, device_bytes, host_bytes)

    def fits(row_tokens: int) -> bool:
        return plan_at(row_tokens) is not None

    low, high = 0, multiple_of
    while fits(high):
        low, high = high, high * 2
        if high > 2**32:
            break
    while high - low > multiple_of:
        middle = (low + high) // 2 // multiple_of * multiple_of
        if fits(middle):
            low = middle
        else:
            high = middle
    return low, (plan_at(low) if low else None)


def longest_row(
    config: PretrainedConfig,
    shape: StepShape,
    device_bytes: int,
    multiple_of: int = 1024,
    host_bytes: int | None = None,
) -> int:
    """`fit_row`'s row length alone."""
    return fit_row(config, shape, device_bytes, host_bytes, multiple_of)[0]
