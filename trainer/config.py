"""`TrainConfig`: every setting of a training run, its default and its help, in one place.

`longdata train` builds its options from these fields (see `trainer.cli`), so a default is
written once, here. A run's settings are layered, later wins: the defaults, a `--config` YAML
(or JSON) file, `--set key=value` pairs, then the command's options. The resolved config is
saved as `<out_dir>/config.json`, which `--config` reads back.

Kept free of torch so that the CLI (and `longdata --help`) imports fast.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from longdata.format import settings

LOSS_MODES = ("token_mean", "sequence_mean")
PRECISIONS = ("auto", "fp32", "bf16")
WEIGHTS = ("auto", "fp32", "bf16", "fp8")
SAVE_FORMATS = ("merged", "adapter", "none")
PARALLEL_MODES = ("ddp", "fsdp")
# Far above any real run, low enough that a typo (batch_size: 10**12) is refused in one line
# before the build is read rather than killed for memory or crashing inside torch.
UPPER_BOUNDS = {
    "steps": 10**9,
    "batch_size": 4096,
    "grad_accum": 1 << 20,
    "lora_rank": 8192,
    "lora_alpha": 1 << 20,
    "threads": 4096,
    "sp": 4096,
    "warmup_steps": 10**9,
    "position_span": 1 << 30,
}
BATCHING_METHODS = ("random", "per_stream")
ATTENTION_PATTERNS = ("full", "shifted_sparse")
REPORTERS = ("tensorboard", "wandb")


DEFAULT_LOSS_CHUNK_TOKENS = 2048  # 1 GiB of fp32 logits at Llama 3's 128K vocabulary
DEFAULT_MLP_CHUNK_TOKENS = 8192


class ConfigError(ValueError):
    """A setting the user gave is wrong; the message is one line that says which and why."""


def resolved_precision(precision: str, bf16_device: bool) -> str:
    """`auto`: bf16 autocast on a bf16-capable GPU, fp32 otherwise."""
    if precision != "auto":
        return precision
    return "bf16" if bf16_device else "fp32"


def resolved_weights(weights: str, lora: bool, bf16_device: bool) -> str:
    """`auto`: bf16 with LoRA on a bf16-capable GPU (the frozen base never needs fp32), fp32
    otherwise (full fine-tuning keeps fp32 master weights)."""
    if weights != "auto":
        return weights
    return "bf16" if lora and bf16_device else "fp32"


def _setting(default: Any, help: str, **extra: Any) -> Any:
    """A field with its CLI help (and, in `extra`, e.g. the option name `cli`)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    """Everything a run needs; saved in every checkpoint and in `<out_dir>/config.json`."""

    build_dir: str | None = _setting(
        None, "A build directory (with manifest.json), or a build's URL (s3://...).", cli=None
    )
    out_dir: str = _setting(
        "runs/latest",
        "Run directory: checkpoints, metrics.jsonl, config.json, final/.",
        cli="--out",
    )
    model: str = _setting(
        "tiny-llama",
        "Preset (tiny-llama, tiny-qwen2, niah-tiny, ruler-tiny: random init, vocab from the "
        "build), a local Hugging Face checkpoint, or a hub id.",
    )
    attention: str = _setting(
        "auto",
        "auto, flash_attn, torch_varlen, flex, sdpa_varlen or sdpa_mask. Every one keeps packed "
        "samples from attending to each other; auto picks the fastest here.",
    )
    attention_pattern: str = _setting(
        "full",
        "full, or shifted_sparse (LongLoRA's S2-Attn, training steps only): attention within "
        "groups formed inside each sample, shifted by half a group in half of the heads. "
        "Evaluation and generate always use full attention.",
    )
    s2_group: float = _setting(
        0.25,
        "shifted_sparse group size: below 1, a fraction of each sample's length (LongLoRA: "
        "0.25); a whole number >= 2, a token count.",
    )
    position_span: int | None = _setting(
        None,
        "PoSE (positional skip-wise training): the positions of each training sample shorter "
        "than N skip once, at a point and by an amount drawn from the sample's own tokens, so "
        "short rows teach the rotary angles of contexts up to N tokens. Unset: positions run "
        "0..L-1. Evaluation and generate always use contiguous positions.",
    )
    split: str | None = _setting(
        None,
        "Split to train on, e.g. train or ctx16k/train. Unset: every training split in stage "
        "order (a staged build's curriculum), steps shared out by stage tokens.",
    )
    steps: int = _setting(100, "Optimizer steps in all (over every stage).")
    stage_steps: list[int] | None = _setting(
        None, "Steps per curriculum stage, comma-separated (e.g. 80,20); they sum to --steps."
    )
    batch_size: int = _setting(1, "Packed rows per micro-batch (per DP rank under torchrun).")
    grad_accum: int = _setting(1, "Micro-batches per optimizer step.")
    lr: float = _setting(3e-4, "Peak learning rate (AdamW).")
    warmup_steps: int = _setting(10, "Linear warmup steps before the cosine decay.")
    min_lr_ratio: float = _setting(0.1, "The cosine decays to lr * min-lr-ratio at the last step.")
    weight_decay: float = _setting(0.0, "AdamW weight decay (never on 1-D parameters).")
    max_grad_norm: float = _setting(1.0, "Clip the gradient norm to this; 0 turns clipping off.")
    loss: str = _setting(
        "token_mean",
        "token_mean: every target token counts equally. sequence_mean: every sample counts "
        "equally whatever its length (LongAlign loss weighting).",
    )
    lora: bool = _setting(False, "Train LoRA adapters instead of all weights.")
    lora_rank: int = _setting(8, "LoRA rank.")
    lora_alpha: int = _setting(16, "LoRA alpha (the adapter's scale is alpha / rank).")
    lora_targets: list[str] = _setting(
        ["q_proj", "k_proj", "v_proj", "o_proj"], "Comma-separated module names LoRA adapts."
    )
    train_embeddings_and_norms: bool = _setting(
        False, "With --lora, also train embeddings and norms (LongLoRA)."
    )
    precision: str = _setting(
        "auto", "auto (bf16 autocast on a bf16 GPU, else fp32), fp32 or bf16."
    )
    weights: str = _setting(
        "auto",
        "dtype the model is loaded in: auto (bf16 with --lora on a bf16 GPU, else fp32), fp32, "
        "bf16 (LoRA only) or fp8 (LoRA only: frozen linears in float8 e4m3, trainer/fp8.py).",
    )
    gradient_checkpointing: bool = _setting(
        False, "Recompute activations in backward to save memory."
    )
    # Memory techniques for long rows (trainer/memory.py, docs/MEMORY.md): none changes the values
    # or the gradients.
    tiled_loss: bool = _setting(
        True, "Output layer + cross-entropy over chunks of targets, recomputed in backward (exact)."
    )
    loss_chunk_tokens: int = _setting(DEFAULT_LOSS_CHUNK_TOKENS, "Targets per tiled-loss chunk.")
    tiled_mlp: bool = _setting(
        False, "Run each layer's MLP over chunks of tokens, recomputed (exact)."
    )
    mlp_chunk_tokens: int = _setting(DEFAULT_MLP_CHUNK_TOKENS, "Tokens per tiled-MLP chunk.")
    offload_activations: bool = _setting(
        False,
        "Keep the checkpointed hidden states in host memory (needs --gradient-checkpointing).",
    )
    offload_layers: int | None = _setting(
        None,
        "With --offload-activations, offload only the first N layers' checkpoints (the rest "
        "stay on the device) when neither memory holds them all (default: every layer).",
    )
    compile: bool = _setting(False, "torch.compile the model.")
    pad_to_multiple_of: int | None = _setting(None, "Pad every batch to a multiple of this length.")
    shuffle: bool = _setting(True, "Shuffle rows (a new order every epoch, from seed and epoch).")
    batching_method: str = _setting(
        "random", "random: batches mix streams; per_stream: each batch from one length bucket."
    )
    remote: str | None = _setting(
        None, "Read shards from this URL root (e.g. s3://b/builds/x), cached locally."
    )
    seed: int = _setting(0, "Seed for init, shuffling and everything else.")
    checkpoint_every: int = _setting(0, "Save a resumable checkpoint every N steps (0: never).")
    keep_checkpoints: int = _setting(
        0, "Keep only the newest N checkpoints in OUT/checkpoints (0: keep all)."
    )
    resume: str | None = _setting(
        None,
        "Continue exactly from a checkpoint: a checkpoint directory, or a run directory (its "
        "newest checkpoint).",
    )
    log_every: int = _setting(1, "Write metrics (and a progress line) every N steps.")
    report_to: list[str] = _setting(
        [], "Also log metrics to: tensorboard (OUT/tensorboard), wandb; comma-separated."
    )
    eval_every: int = _setting(
        0, "Every N steps, the validation loss on the stage's validation split (0: never)."
    )
    eval_split: str | None = _setting(
        None, "Split --eval-every evaluates (default: the current stage's validation split)."
    )
    peak_tflops: float | None = _setting(
        None,
        "Peak dense TFLOP/s of one device, for MFU (default: known for bf16 on A100, H100, H200; "
        "else MFU is not reported).",
    )
    save: str = _setting(
        "merged", "Final HF checkpoint in OUT/final: merged, adapter (LoRA only) or none."
    )
    device: str = _setting("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    threads: int | None = _setting(None, "torch intra-op CPU threads (default: torch's choice).")
    progress: bool = _setting(True, "Show a progress bar (or a line per logged step).")
    parallel: str = _setting(
        "ddp",
        "Under torchrun: ddp (every rank holds the whole model) or fsdp (FSDP2: weights, "
        "gradients and optimizer state sharded across ranks). Ignored in one process.",
    )
    sp: int = _setting(
        1,
        "Sequence parallelism (Ulysses): split every row along the sequence across this many "
        "ranks; must divide the number of ranks and the model's attention heads.",
    )

    def validate(self, needs_build: bool = True) -> None:
        """Raise `ConfigError` for a value no run can use (the build is not read here; with
        `needs_build` False, e.g. to plan a run's memory, none need be named)."""
        if needs_build and not self.build_dir:
            raise ConfigError("no build: pass BUILD or set build_dir in the --config file")
        for name, choices in (
            ("loss", LOSS_MODES),
            ("precision", PRECISIONS),
            ("weights", WEIGHTS),
            ("save", SAVE_FORMATS),
            ("parallel", PARALLEL_MODES),
            ("batching_method", BATCHING_METHODS),
            ("attention_pattern", ATTENTION_PATTERNS),
        ):
            if getattr(self, name) not in choices:
                raise ConfigError(
                    f"{name} must be one of {', '.join(choices)}, not {getattr(self, name)!r}"
                )
        unknown = [name for name in self.report_to if name not in REPORTERS]
        if unknown:
            raise ConfigError(
                f"report_to: unknown {unknown[0]!r}; choose from {', '.join(REPORTERS)}"
            )
        if self.save == "adapter" and not self.lora:
            raise ConfigError("save: adapter needs lora")
        if self.weights in ("bf16", "fp8") and not self.lora:
            # AdamW updates of ~lr * 1e-3 vanish below bf16's 8-bit mantissa on full weights.
            raise ConfigError(
                f"weights {self.weights} needs lora: full fine-tuning keeps fp32 master weights "
                "(bf16 would round small updates away)"
            )
        if self.weights == "fp8" and self.save == "merged":
            raise ConfigError(
                "weights fp8 with save merged would bake fp8 rounding into the base: "
                "set save adapter (or none)"
            )
        if self.parallel == "fsdp" and self.lora:
            raise ConfigError("lora with parallel fsdp is not supported; use parallel ddp")
        if self.offload_activations and not self.gradient_checkpointing:
            raise ConfigError(
                "offload_activations moves the checkpointed hidden states to the "
                "host: it needs gradient_checkpointing"
            )
        if self.offload_layers is not None:
            if not self.offload_activations:
                raise ConfigError("offload_layers splits offload_activations: turn that on")
            if self.offload_layers < 0:
                raise ConfigError(f"offload_layers must be >= 0, not {self.offload_layers}")
        for name in (
            "steps",
            "batch_size",
            "grad_accum",
            "sp",
            "log_every",
            "lora_rank",
            "loss_chunk_tokens",
            "mlp_chunk_tokens",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, not {getattr(self, name)}")
        for name in ("warmup_steps", "checkpoint_every", "keep_checkpoints", "eval_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, not {getattr(self, name)}")
        if self.position_span is not None and self.position_span < 2:
            raise ConfigError(f"position_span must be >= 2, not {self.position_span}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1, not {self.threads}")
        for name, bound in UPPER_BOUNDS.items():
            value = getattr(self, name)
            if value is not None and value > bound:
                raise ConfigError(f"{name} must be <= {bound:,}, not {value:,}")
        if not (0 < self.lr < math.inf):
            raise ConfigError(f"lr must be a positive finite number, not {self.lr}")
        if not (0 <= self.weight_decay < math.inf):
            raise ConfigError(f"weight_decay must be >= 0 and finite, not {self.weight_decay}")
        if self.stage_steps is not None:
            if self.split is not None:
                raise ConfigError("stage_steps is for a curriculum: leave split unset")
            if min(self.stage_steps, default=0) < 1 or sum(self.stage_steps) != self.steps:
                raise ConfigError(
                    f"stage_steps {self.stage_steps} must be >= 1 each and sum to steps "
                    f"({self.steps})"
                )
        if not (0 < self.s2_group < 1 or (self.s2_group >= 2 and self.s2_group % 1 == 0)):
            raise ConfigError(
                f"s2_group must be a fraction in (0, 1) or a whole token count >= 2, "
                f"not {self.s2_group}"
            )
        if self.attention_pattern == "shifted_sparse" and self.sp > 1:
            raise ConfigError(
                "attention_pattern shifted_sparse with sp > 1 is not supported (Ulysses would "
                "need the groups of every shard's heads); use sp 1"
            )
        # A negative clip norm flips every gradient (training climbs the loss) and a ratio
        # outside [0, 1] makes the cosine end above the peak or below zero.
        if not (0 <= self.max_grad_norm < math.inf):
            raise ConfigError(f"max_grad_norm must be >= 0 (0 = off), not {self.max_grad_norm}")
        if not (0 <= self.min_lr_ratio <= 1):
            raise ConfigError(f"min_lr_ratio must be in [0, 1], not {self.min_lr_ratio}")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ConfigError(f"peak_tflops must be > 0, not {self.peak_tflops}")
        if self.eval_every and self.sp > 1:
            raise ConfigError(
                "eval_every with sp > 1 is not supported (evaluate afterwards "
                "with `longdata eval loss`)"
            )


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}
FIELD_TYPES: dict[str, Any] = typing.get_type_hints(TrainConfig)


def defaults() -> dict[str, Any]:
    """Every field's default (build_dir None)."""
    return dataclasses.asdict(TrainConfig())


def value_type(name: str) -> tuple[Any, bool]:
    """(the field's type without `| None`, whether None is allowed)."""
    return settings.value_type(FIELD_TYPES[name])


def coerce(name: str, value: Any) -> Any:
    """`value` (from YAML, `--set` or an option) as field `name`'s type, or `ConfigError`;
    typed as `longdata.format.settings.coerce` types every setting."""
    with _as_config_error():
        return settings.coerce(name, FIELD_TYPES[name], value)


def _check_key(name: str, where: str) -> None:
    with _as_config_error():
        settings.check_key(name, FIELDS, where)


@contextmanager
def _as_config_error() -> Iterator[None]:
    """The shared grammar's one-line errors, raised as the trainer's `ConfigError`."""
    try:
        yield
    except settings.SettingError as error:
        raise ConfigError(str(error)) from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML (or JSON) mapping of settings, read as every settings file is
    (`longdata.format.settings.read_settings_file`), keys checked."""
    with _as_config_error():
        data = settings.read_settings_file(path, "training config")
    for name in data:
        _check_key(str(name), str(path))
    return dict(data)


def parse_set(text: str) -> tuple[str, Any]:
    """`key=value` in the grammar `longdata build --set` uses too (`steps=5` is 5, `lora=true`
    is True); the key must be a field."""
    with _as_config_error():
        assignment = settings.parse_assignment(text)
    _check_key(assignment.key, "--set")
    return assignment.key, assignment.value


def resolve(
    config_file: str | Path | None = None,
    assignments: typing.Sequence[str] = (),
    options: dict[str, Any] | None = None,
) -> TrainConfig:
    """The run's config: defaults, then the file, then `--set`, then options that were given
    (None means not given); checked. With `stage_steps` and no `steps` anywhere, `steps` is
    their sum."""
    layered: dict[str, Any] = {}
    if config_file is not None:
        layered.update(read_config_file(config_file))
    layered.update(parse_set(assignment) for assignment in assignments)
    for name, value in (options or {}).items():
        _check_key(name, "options")
        if value is not None:
            layered[name] = value
    settings = {name: coerce(name, value) for name, value in layered.items()}
    if settings.get("stage_steps") and "steps" not in settings:
        settings["steps"] = sum(settings["stage_steps"])
    config = TrainConfig(**settings)
    config.validate()
    return config
