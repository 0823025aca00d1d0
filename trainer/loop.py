"""The training loop: stream packed rows, step AdamW, checkpoint so a killed run resumes exactly.

Under torchrun the same loop runs on every rank (see `trainer.distributed`): each DP rank
streams its own rows, each SP group its own rows split along the sequence, the step's loss is
normalised over all ranks, and rank 0 alone logs and writes files.

Read top to bottom: `TrainConfig` says what can be set; `train` builds the model, data and
optimizer, then runs steps. A step draws `grad_accum` micro-batches first, so the loss can be
normalised by the whole step's target tokens (or samples), then runs forward and backward on
each. Every `checkpoint_every` steps, `<out_dir>/checkpoints/step_<N>.pt` captures the trainable
weights, optimizer, scheduler, RNG states and the dataloader's position; `resume=True` continues
from the newest one and reproduces the uninterrupted run step for step.
"""

from __future__ import annotations

import json
import math
import random
import resource
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel

from trainer.data import Manifest, make_dataloader, make_dataset, release_streaming_resources
from trainer.distributed import (
    PARALLEL_MODES,
    ParallelContext,
    enable_sequence_parallel,
    init_parallel,
    shard_batch,
    shutdown_parallel,
    wrap_model,
)
from trainer.loss import LOSS_MODES, TargetScorer, step_denominator
from trainer.memory import (
    DEFAULT_LOSS_CHUNK_TOKENS,
    DEFAULT_MLP_CHUNK_TOKENS,
    enable_activation_offload,
    enable_tiled_mlp,
)
from trainer.model import PRESETS, load_model
from trainer.step import micro_step

PRECISIONS = ("auto", "fp32", "bf16")
SAVE_FORMATS = ("merged", "adapter", "none")


@dataclass
class TrainConfig:
    """Everything a run needs; saved in every checkpoint and in `<out_dir>/config.json`."""

    build_dir: str
    out_dir: str = "runs/latest"
    model: str = "tiny-llama"  # preset, local HF checkpoint or hub id
    attention: str = "auto"
    split: str = "train"
    steps: int = 100
    batch_size: int = 1  # packed rows per micro-batch (per DP rank under torchrun)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-4
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    loss: str = "token_mean"
    lora: bool = False
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    train_embeddings_and_norms: bool = False  # with LoRA, as LongLoRA does
    precision: str = "auto"  # bf16 autocast on CUDA with bf16 support, else fp32
    gradient_checkpointing: bool = False
    # Memory techniques for long rows (trainer.memory); none changes the values or gradients.
    tiled_loss: bool = True  # output layer + cross-entropy over chunks of targets
    loss_chunk_tokens: int = DEFAULT_LOSS_CHUNK_TOKENS
    tiled_mlp: bool = False  # each layer's MLP over chunks of tokens
    mlp_chunk_tokens: int = DEFAULT_MLP_CHUNK_TOKENS
    offload_activations: bool = False  # checkpointed hidden states to host memory
    compile: bool = False
    pad_to_multiple_of: int | None = None
    shuffle: bool = True
    batching_method: str = "random"
    remote: str | None = None  # read streams from <remote>/<path>, caching in the build dir
    seed: int = 0
    checkpoint_every: int = 0  # 0: no intermediate checkpoints
    log_every: int = 1
    save: str = "merged"  # final HF checkpoint: merged weights, LoRA adapter only, or none
    resume: bool = False
    device: str = "auto"
    progress: bool = True
    parallel: str = "ddp"  # under torchrun: ddp (replicated weights) or fsdp (FSDP2, sharded)
    sp: int = 1  # sequence-parallel group size: ranks that split each row along the sequence

    def validate(self) -> None:
        if self.loss not in LOSS_MODES:
            raise ValueError(f"loss must be one of {LOSS_MODES}, not {self.loss!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {self.precision!r}")
        if self.save not in SAVE_FORMATS:
            raise ValueError(f"save must be one of {SAVE_FORMATS}, not {self.save!r}")
        if self.save == "adapter" and not self.lora:
            raise ValueError("save='adapter' needs lora=True")
        if min(self.steps, self.batch_size, self.grad_accum, self.sp) < 1:
            raise ValueError("steps, batch_size, grad_accum and sp must be >= 1")
        if self.parallel not in PARALLEL_MODES:
            raise ValueError(f"parallel must be one of {PARALLEL_MODES}, not {self.parallel!r}")
        if self.parallel == "fsdp" and self.lora:
            raise ValueError("lora with parallel='fsdp' is not supported; use parallel='ddp'")
        if min(self.loss_chunk_tokens, self.mlp_chunk_tokens) < 1:
            raise ValueError("loss_chunk_tokens and mlp_chunk_tokens must be >= 1")
        if self.offload_activations and not self.gradient_checkpointing:
            raise ValueError(
                "offload_activations moves the checkpointed hidden states to the host: it "
                "needs gradient_checkpointing"
            )


@dataclass(frozen=True)
class StepMetrics:
    """What one optimizer step did; also written as one JSONL line."""

    step: int
    loss: float
    lr: float
    grad_norm: float
    tokens: int  # real (non-padding) tokens
    target_tokens: int
    tokens_per_s: float
    target_tokens_per_s: float
    loss_per_source: dict[str, float]
    peak_memory_mb: float
    elapsed_s: float


@dataclass
class TrainResult:
    metrics: list[StepMetrics]
    final_dir: Path | None


# ---------------------------------------------------------------------------------------------
# Setup


def _autocast(precision: str, device: torch.device) -> Any:
    use_bf16 = precision == "bf16" or (
        precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()


def _build_model(config: TrainConfig, manifest: Manifest, device: torch.device) -> PreTrainedModel:
    model = load_model(
        config.model,
        config.attention,
        vocab_size=manifest.vocab_size,
        seed=config.seed,
        device=device,
    )
    if config.model in PRESETS:
        _use_build_special_tokens(model, manifest)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.lora:
        from peft import LoraConfig, get_peft_model

        # peft matches modules_to_save by name suffix: "norm" covers every RMSNorm.
        extra_trainable = ["embed_tokens", "norm"] if config.train_embeddings_and_norms else None
        lora_config = LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            lora_dropout=0.0,
            target_modules=list(config.lora_targets),
            modules_to_save=extra_trainable,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora_config)
    if config.tiled_mlp:
        enable_tiled_mlp(model, config.mlp_chunk_tokens)
    if config.offload_activations:
        enable_activation_offload(model)
    if config.compile:
        model.compile()
    return model


def _use_build_special_tokens(model: PreTrainedModel, manifest: Manifest) -> None:
    """A preset's config carries transformers' default token ids (e.g. Llama's eos 2), which
    mean nothing in the build's vocabulary; use the build tokenizer's, so the saved checkpoint
    stops generating at the right token."""
    tokenizer = manifest.raw.get("tokenizer") or {}
    for name in ("eos_token_id", "pad_token_id"):
        setattr(model.config, name, tokenizer.get(name))
        setattr(model.generation_config, name, tokenizer.get(name))
    model.config.bos_token_id = model.generation_config.bos_token_id = None


def _lr_schedule(config: TrainConfig) -> Callable[[int], float]:
    """Linear warmup to the peak, then cosine decay to `min_lr_ratio` of it at the last step."""

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        decay_steps = max(config.steps - config.warmup_steps, 1)
        progress = min((step - config.warmup_steps) / decay_steps, 1.0)
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine

    return factor


def _optimizer(model: PreTrainedModel, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW without weight decay on biases, norms and other 1-D parameters."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decayed = [p for _, p in trainable if p.ndim >= 2]
    undecayed = [p for _, p in trainable if p.ndim < 2]
    return torch.optim.AdamW(
        [
            {"params": decayed, "weight_decay": config.weight_decay},
            {"params": undecayed, "weight_decay": 0.0},
        ],
        lr=config.lr,
    )


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _full_state(
    model: PreTrainedModel, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Whole (unsharded) trainable weights and optimizer state, on CPU, keyed by name.

    A collective under FSDP (every rank must call it; the shards are gathered). Only trainable
    weights are kept: the frozen rest (LoRA's base) is rebuilt from the model spec and seed.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optimizer_state = get_state_dict(model, optimizer, options=options)
    return {k: v for k, v in model_state.items() if k in trainable}, optimizer_state


def _load_full_state(
    model: PreTrainedModel, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load `_full_state`'s output on every rank (FSDP keeps each rank's shard of it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
        options=StateDictOptions(full_state_dict=True, strict=False),
    )


def _rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _every_rank_rng(context: ParallelContext) -> list[dict[str, Any]]:
    """Every rank's RNG state, in rank order (a collective under torchrun)."""
    if not context.distributed:
        return [_rng_state()]
    states: list[Any] = [None] * context.world_size
    dist.all_gather_object(states, _rng_state())
    return states


def _save_checkpoint(
    path: Path,
    step: int,
    model: PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loader: Any,
    config: TrainConfig,
    context: ParallelContext,
) -> None:
    """Rank 0 writes one file holding the whole state and every rank's RNG.

    Every rank calls this (gathering sharded weights and RNG states are collectives). The data
    position needs no gathering: streaming's loader state counts the samples the whole world
    has consumed, which is the same number on every rank.
    """
    model_state, optimizer_state = _full_state(model, optimizer)
    rng_states = _every_rank_rng(context)
    if not context.is_main:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step,
        "model": model_state,
        "optimizer": optimizer_state,
        "scheduler": scheduler.state_dict(),
        "rng": rng_states,
        "dataloader": loader.state_dict(),
        "world_size": context.world_size,
        "config": asdict(config),
    }
    partial = path.with_suffix(".partial")
    torch.save(state, partial)
    partial.replace(path)  # atomic: a kill mid-save leaves the previous checkpoint intact


def _resume(
    path: Path,
    model: PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loader: Any,
    context: ParallelContext,
) -> int:
    """Restore a checkpoint on every rank (the run directory must be readable by all of them);
    returns its step."""
    state = torch.load(path, weights_only=False)
    if state.get("world_size", 1) != context.world_size:
        raise ValueError(
            f"{path} was written by {state.get('world_size', 1)} ranks; resume it with the "
            f"same number (this run has {context.world_size})"
        )
    _load_full_state(model, optimizer, state)
    scheduler.load_state_dict(state["scheduler"])
    loader.load_state_dict(state["dataloader"])
    _restore_rng(state["rng"][context.rank])
    return state["step"]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    checkpoints = sorted((Path(out_dir) / "checkpoints").glob("step_*.pt"))
    return checkpoints[-1] if checkpoints else None


# ---------------------------------------------------------------------------------------------
# The loop


def _micro_batches(loader: Any) -> Iterator[dict[str, Any]]:
    """Batches forever, epoch after epoch (streaming reshuffles each epoch).

    A run resumed exactly at the end of an epoch first sees that epoch's empty remainder, so
    only two empty epochs in a row mean the split has no rows.
    """
    empty_epochs = 0
    while empty_epochs < 2:
        empty_epochs += 1
        for batch in loader:
            empty_epochs = 0
            yield batch
    raise ValueError("the training split has no rows")


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is the whole process's peak resident memory, in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train(config: TrainConfig, on_step: Callable[[StepMetrics], None] | None = None) -> TrainResult:
    """Train on a longdata build; returns the per-step metrics and the final checkpoint dir.

    Under torchrun, call it on every rank: it joins the process group and leaves it at the end.
    """
    config.validate()
    context = init_parallel(config.sp, config.device)
    try:
        return _train(config, context, on_step)
    finally:
        shutdown_parallel(context)


def _train(
    config: TrainConfig, context: ParallelContext, on_step: Callable[[StepMetrics], None] | None
) -> TrainResult:
    device = context.device
    out_dir = Path(config.out_dir)
    if context.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(asdict(config), indent=2))
    manifest = Manifest.read(config.build_dir)
    sources = manifest.source_names

    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    model = _build_model(config, manifest, device)
    if context.sp_size > 1:
        enable_sequence_parallel(model, config.attention, context.sp_group)
    # DDP / FSDP wrap the module whose forward computes the losses; the optimizer is built after
    # wrapping because FSDP replaces the parameters with sharded ones.
    loss_chunk_tokens = config.loss_chunk_tokens if config.tiled_loss else 0
    scorer = wrap_model(TargetScorer(model, loss_chunk_tokens), config.parallel, context)
    optimizer = _optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_schedule(config))
    dataset = make_dataset(
        manifest,
        config.split,
        config.batch_size,
        shuffle=config.shuffle,
        shuffle_seed=config.seed,
        batching_method=config.batching_method,
        remote=config.remote,
        replication=context.sp_size,
    )
    # Rows are padded to a multiple of sp so that they split into equal sequence shards.
    pad_to_multiple_of = math.lcm(config.pad_to_multiple_of or 1, context.sp_size)
    loader = make_dataloader(dataset, config.batch_size, pad_to_multiple_of)

    start_step = 0
    checkpoint = latest_checkpoint(out_dir) if config.resume else None
    if checkpoint is not None:
        start_step = _resume(checkpoint, model, optimizer, scheduler, loader, context)

    metrics_file = (out_dir / "metrics.jsonl").open("a") if context.is_main else None
    progress = _Progress(config, start_step, enabled=context.is_main)
    results: list[StepMetrics] = []
    try:
        batches = _micro_batches(loader)
        model.train()
        for step in range(start_step + 1, config.steps + 1):
            started = time.perf_counter()
            micro_batches = [_to_device(next(batches), device) for _ in range(config.grad_accum)]
            # Normalised by the whole step's target tokens (or samples) over every DP rank. The
            # ranks of an SP group hold the same rows, so they are counted once (over DP).
            denominator = int(
                context.all_reduce_sum(
                    torch.tensor(step_denominator(config.loss, micro_batches)), over="dp"
                )
            )
            step_loss = torch.zeros((), dtype=torch.float64)
            source_sums = torch.zeros(len(sources), dtype=torch.float64)
            source_counts = torch.zeros(len(sources), dtype=torch.float64)
            for batch in micro_batches:
                if context.sp_size > 1:
                    batch = shard_batch(batch, context.sp_rank, context.sp_size)
                done = micro_step(
                    scorer,
                    batch,
                    config.loss,
                    denominator,
                    precision=_autocast(config.precision, device),
                    gradient_scale=context.gradient_scale,
                )
                step_loss += done.loss
                target_sources = done.losses.source_ids.cpu()
                source_sums.index_add_(0, target_sources, done.losses.values.double().cpu())
                source_counts.index_add_(
                    0, target_sources, torch.ones(len(target_sources)).double()
                )
            # Every rank scored different targets: the step's figures are sums over the world.
            for partial_sum in (step_loss, source_sums, source_counts):
                context.all_reduce_sum(partial_sum)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
                grad_norm = grad_norm.full_tensor()
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - started

            counts = torch.tensor(
                [
                    sum(int((b["sample_ids"] >= 0).sum()) for b in micro_batches),
                    sum(int(b["sample_target_counts"].sum()) for b in micro_batches),
                ]
            )
            tokens, targets = context.all_reduce_sum(counts, over="dp").tolist()
            metrics = StepMetrics(
                step=step,
                loss=float(step_loss),
                lr=lr,
                grad_norm=float(grad_norm),
                tokens=tokens,
                target_tokens=targets,
                tokens_per_s=tokens / elapsed,
                target_tokens_per_s=targets / elapsed,
                loss_per_source={
                    name: float(source_sums[i] / source_counts[i])
                    for i, name in enumerate(sources)
                    if source_counts[i] > 0
                },
                peak_memory_mb=_peak_memory_mb(device),
                elapsed_s=elapsed,
            )
            results.append(metrics)
            if config.checkpoint_every and step % config.checkpoint_every == 0:
                path = out_dir / "checkpoints" / f"step_{step:07d}.pt"
                _save_checkpoint(path, step, model, optimizer, scheduler, loader, config, context)
            if metrics_file and (step % config.log_every == 0 or step == config.steps):
                metrics_file.write(json.dumps(asdict(metrics)) + "\n")
                metrics_file.flush()
            progress.update(metrics)
            if on_step is not None:
                on_step(metrics)
        final_dir = _save_final(model, config, out_dir, context)
    finally:
        progress.close()
        if metrics_file:
            metrics_file.close()
        del loader, dataset
        release_streaming_resources()
    return TrainResult(metrics=results, final_dir=final_dir)


def _save_final(
    model: PreTrainedModel, config: TrainConfig, out_dir: Path, context: ParallelContext
) -> Path | None:
    """Write an HF checkpoint that `AutoModelForCausalLM.from_pretrained` loads (rank 0), with
    the build's tokenizer beside it (`AutoTokenizer.from_pretrained` loads that)."""
    if config.save == "none":
        return None
    final_dir = out_dir / "final"
    if isinstance(next(model.parameters()), DTensor):
        # FSDP: gather the whole weights (a collective), then rank 0 writes them.
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state_dict = get_model_state_dict(model, options=options)
        if context.is_main:
            model.save_pretrained(final_dir, state_dict=state_dict)
            _save_tokenizer(config, final_dir)
        return final_dir
    if not context.is_main:
        return final_dir
    if config.lora and config.save == "merged":
        model = model.merge_and_unload()
    model.save_pretrained(final_dir)
    _save_tokenizer(config, final_dir)
    return final_dir


def _save_tokenizer(config: TrainConfig, final_dir: Path) -> None:
    """Put the build's tokenizer next to the weights, so the checkpoint is self-contained.

    A missing or mismatched tokenizer must not cost a finished run: it is reported, not raised.
    """
    from trainer.tokenizer import save_build_tokenizer

    problem = save_build_tokenizer(config.build_dir, final_dir)
    if problem:
        print(
            f"warning: {final_dir} has no tokenizer ({problem}); pass --tokenizer to "
            "`longdata eval`, or save one there with AutoTokenizer.save_pretrained",
            file=sys.stderr,
        )


class _Progress:
    """A rich progress bar on a terminal, one plain line per logged step otherwise."""

    def __init__(self, config: TrainConfig, start_step: int, enabled: bool = True) -> None:
        self._config = config
        self._enabled = enabled and config.progress
        self._rich = None
        if self._enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self._rich = Progress(
                TextColumn("step {task.completed}/{task.total}"),
                BarColumn(),
                TextColumn("{task.fields[status]}"),
                TimeRemainingColumn(),
            )
            self._task = self._rich.add_task(
                "train", total=config.steps, completed=start_step, status=""
            )
            self._rich.start()

    def update(self, metrics: StepMetrics) -> None:
        status = (
            f"loss {metrics.loss:.4f}  {metrics.tokens_per_s:,.0f} tok/s  "
            f"{metrics.target_tokens_per_s:,.0f} target tok/s  peak {metrics.peak_memory_mb:,.0f} MB"
        )
        if self._rich is not None:
            self._rich.update(self._task, completed=metrics.step, status=status)
        elif self._enabled and metrics.step % self._config.log_every == 0:
            print(f"step {metrics.step}/{self._config.steps}  {status}", file=sys.stderr)

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()
