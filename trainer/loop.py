"""The training loop: stream packed rows, step AdamW, checkpoint so a killed run resumes exactly.

Under torchrun the same loop runs on every rank (see `trainer.distributed`): each DP rank
streams its own rows, each SP group its own rows split along the sequence, the step's loss is
normalised over all ranks, and rank 0 alone logs and writes files.

Read top to bottom: `_train` prepares the run directory, builds the model, optimizer and
schedule once into a `RunState`, then runs the steps of each stage (`trainer.curriculum`: one
split, or a staged build's training splits in order). A step draws `grad_accum` micro-batches
first, so the loss can be normalised by the whole step's target tokens (or samples), then runs
forward and backward on each. The run's `Checkpointer` (`trainer.checkpoint`) owns the
checkpoints: every `checkpoint_every` steps it captures the trainable weights, optimizer,
scheduler, RNG states and the dataloader's position, keeps the newest `keep_checkpoints`, and
restores the one `resume` names, so a resumed run reproduces the uninterrupted one step for
step, across stage boundaries too.
"""

from __future__ import annotations

import json
import math
import random
import resource
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel

from longdata.trainer.attention import shifted_sparse_inputs
from longdata.trainer.checkpoint import Checkpointer, claim_run_dir
from longdata.trainer.config import TrainConfig, resolved_precision, resolved_weights
from longdata.trainer.curriculum import Stage, plan_stages, validation_split
from longdata.trainer.data import Manifest, make_dataloader, make_dataset
from longdata.trainer.distributed import (
    ParallelContext,
    enable_sequence_parallel,
    init_parallel,
    shard_batch,
    shutdown_parallel,
    wrap_model,
)
from longdata.trainer.flops import (
    FlopShape,
    device_peak_tflops,
    squared_group_lengths,
    squared_sample_lengths,
    training_flops,
)
from longdata.trainer.fp8 import quantize_frozen_linears
from longdata.trainer.loss import TargetScorer, step_denominator
from longdata.trainer.memory import (
    enable_activation_offload,
    enable_tiled_mlp,
    share_adapter_inputs,
)
from longdata.trainer.model import PRESETS, load_model
from longdata.trainer.reporting import MetricsLog
from longdata.trainer.step import micro_step
from longdata.trainer.validation_loss import evaluate_loss

__all__ = ["StepMetrics", "TrainConfig", "TrainResult", "train"]


@dataclass(frozen=True)
class StepMetrics:
    """What one optimizer step did; also written as one JSONL line."""

    step: int
    split: str  # the split (curriculum stage) this step trained on
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
    model_flops: float  # forward + backward, see trainer.flops
    model_tflops_per_s: float
    mfu: float | None  # None where no peak FLOP/s is known (CPU; set peak_tflops)
    validation: dict[str, Any] | None = None  # with eval_every: the validation split's loss


@dataclass
class TrainResult:
    metrics: list[StepMetrics]
    final_dir: Path | None


# ---------------------------------------------------------------------------------------------
# Setup


def _bf16_gpu(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def _uses_bf16(precision: str, device: torch.device) -> bool:
    return resolved_precision(precision, _bf16_gpu(device)) == "bf16"


def _autocast(precision: str, device: torch.device) -> Any:
    if _uses_bf16(precision, device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def resolve_weights(weights: str, lora: bool, device: torch.device) -> str:
    """The dtype the model loads in on `device` (`trainer.config.resolved_weights`)."""
    return resolved_weights(weights, lora, _bf16_gpu(device))


def _build_model(config: TrainConfig, manifest: Manifest, device: torch.device) -> PreTrainedModel:
    weights = resolve_weights(config.weights, config.lora, device)
    model = load_model(
        config.model,
        config.attention,
        vocab_size=manifest.vocab_size,
        seed=config.seed,
        device=device,
        # fp8 loads bf16 and quantises the frozen linears once PEFT has wrapped them.
        dtype=torch.float32 if weights == "fp32" else torch.bfloat16,
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
        if _uses_bf16(config.precision, device):
            share_adapter_inputs(model)
        if weights == "fp8":
            quantize_frozen_linears(model)
    if config.tiled_mlp:
        enable_tiled_mlp(model, config.mlp_chunk_tokens)
    if config.offload_activations:
        enable_activation_offload(model, config.offload_layers)
    if config.compile:
        model.compile()
    return model


def _use_build_special_tokens(model: PreTrainedModel, manifest: Manifest) -> None:
    """A preset's config carries transformers' default token ids (e.g. Llama's eos 2), which
    mean nothing in the build's vocabulary; use the build tokenizer's, so the saved checkpoint
    stops generating at the right token."""
    for name in ("eos_token_id", "pad_token_id"):
        setattr(model.config, name, getattr(manifest.tokenizer, name))
        setattr(model.generation_config, name, getattr(manifest.tokenizer, name))
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
# The loop


class _SplitStream:
    """Batches of one split forever, epoch after epoch (each epoch reshuffled), from a
    saved dataloader position if given.

    A run resumed exactly at the end of an epoch first sees that epoch's empty remainder, so
    only two empty epochs in a row mean the split has no rows.
    """

    def __init__(
        self,
        manifest: Manifest,
        split: str,
        config: TrainConfig,
        context: ParallelContext,
        position: dict[str, Any] | None = None,
    ) -> None:
        self.split = split
        self._manifest = manifest
        self._config = config
        self._context = context
        self._open(position)

    def _open(self, position: dict[str, Any] | None) -> None:
        config = self._config
        self._dataset = make_dataset(
            self._manifest,
            self.split,
            config.batch_size,
            shuffle=config.shuffle,
            shuffle_seed=config.seed,
            batching_method=config.batching_method,
            remote=config.remote,
            replication=self._context.sp_size,
        )
        # Rows are padded to a multiple of sp so that they split into equal sequence shards.
        pad_to_multiple_of = math.lcm(config.pad_to_multiple_of or 1, self._context.sp_size)
        self._loader = make_dataloader(
            self._dataset,
            config.batch_size,
            pad_to_multiple_of,
            position_span=config.position_span,
            position_seed=config.seed,
        )
        if position is not None:
            self._loader.load_state_dict(position)
        self._batches = self._forever()

    def _forever(self) -> Iterator[dict[str, Any]]:
        empty_epochs = 0
        while empty_epochs < 2:
            empty_epochs += 1
            for batch in self._loader:
                empty_epochs = 0
                yield batch
        raise ValueError(f"the training split {self.split} has no rows")

    def next(self) -> dict[str, Any]:
        return next(self._batches)

    def position(self) -> dict[str, Any]:
        return self._loader.state_dict()

    @contextmanager
    def released(self) -> Iterator[None]:
        """Free this stream's cached shard while something else reads the build (validation
        reads its own), then reopen it at the same position."""
        position = self.position()
        self.close()
        yield
        self._open(position)

    def close(self) -> None:
        if self._loader is None:
            return
        self._batches.close()
        self._loader = self._dataset = None


@dataclass
class RunState:
    """What the loop carries from step to step: fixed for the run, then what each step moves."""

    config: TrainConfig
    context: ParallelContext
    manifest: Manifest
    model: PreTrainedModel
    scorer: torch.nn.Module  # the (DDP/FSDP-wrapped) module whose forward computes the losses
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    flop_shape: FlopShape
    peak_tflops: float | None
    step: int  # the last finished optimizer step (the checkpoint's when resumed, else 0)
    stage: Stage | None = None  # the curriculum stage being trained
    stream: _SplitStream | None = None  # its batches; the loader position a checkpoint keeps
    metrics: list[StepMetrics] = field(default_factory=list)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is the whole process's peak resident memory, in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _validation(run: RunState) -> dict[str, Any] | None:
    """The validation loss on the stage's validation split, None where the build has none.

    Every rank computes it (FSDP's forward is collective).
    """
    config, device = run.config, run.context.device
    split = validation_split(run.manifest, config, run.stage.split)
    if split is None:
        return None
    with _autocast(config.precision, device):
        overall = evaluate_loss(
            run.model, run.manifest, split, batch_size=config.batch_size
        ).overall()
    run.model.train()
    return {
        "split": split,
        "token_mean": overall.token_mean,
        "sequence_mean": overall.sequence_mean,
        "perplexity": overall.perplexity,
        "target_tokens": overall.target_tokens,
    }


def train(config: TrainConfig, on_step: Callable[[StepMetrics], None] | None = None) -> TrainResult:
    """Train on a longdata build; returns the per-step metrics and the final checkpoint dir.

    Under torchrun, call it on every rank: it joins the process group and leaves it at the end.
    A setting or `resume` path that cannot work raises `trainer.config.ConfigError`.
    """
    config.validate()
    if config.threads:
        torch.set_num_threads(config.threads)
    context = init_parallel(config.sp, config.device)
    try:
        return _train(config, context, on_step)
    finally:
        shutdown_parallel(context)


def _train(
    config: TrainConfig, context: ParallelContext, on_step: Callable[[StepMetrics], None] | None
) -> TrainResult:
    manifest = Manifest.read(config.build_dir)
    stages = plan_stages(manifest, config)
    # Looks the resume checkpoint up now: a wrong --resume fails before anything is written.
    checkpointer = Checkpointer(config, context)
    _prepare_out_dir(config, context, checkpointer)
    run = _start_run(config, context, manifest, checkpointer)
    log = MetricsLog(config, run.step, enabled=context.is_main)
    progress = _Progress(config, run.step, enabled=context.is_main)
    try:
        run.model.train()
        for stage in stages:
            if stage.last_step <= run.step:
                continue
            run.stage = stage
            position = checkpointer.loader_position(stage)
            run.stream = _SplitStream(manifest, stage.split, config, context, position)
            while run.step < stage.last_step:
                metrics = _step(run)
                if config.eval_every and run.step % config.eval_every == 0:
                    with run.stream.released():
                        metrics = replace(metrics, validation=_validation(run))
                run.metrics.append(metrics)
                checkpointer.save_if_due(run.step, run.stream)
                if (
                    run.step % config.log_every == 0
                    or run.step == config.steps
                    or metrics.validation
                ):
                    log.write(asdict(metrics))
                progress.update(metrics)
                if on_step is not None:
                    on_step(metrics)
            run.stream.close()
        final_dir = _save_final(run.model, config, Path(config.out_dir), context)
    finally:
        progress.close()
        log.close()
        if run.stream is not None:
            run.stream.close()
    return TrainResult(metrics=run.metrics, final_dir=final_dir)


def _prepare_out_dir(
    config: TrainConfig, context: ParallelContext, checkpointer: Checkpointer
) -> None:
    """The one place the run directory is claimed (rank 0: new, or longdata's own run; one with
    checkpoints only when resuming) and the resolved config written into it."""
    if not context.is_main:
        return
    out_dir = claim_run_dir(config.out_dir, resuming=checkpointer.resume_from is not None)
    (out_dir / "config.json").write_text(json.dumps(asdict(config), indent=2))


def _start_run(
    config: TrainConfig, context: ParallelContext, manifest: Manifest, checkpointer: Checkpointer
) -> RunState:
    """Seed, build the model, optimizer and schedule, and restore the resume checkpoint's state
    into them (its RNG states last, so they are what the first step draws from)."""
    device = context.device
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
    start_step = checkpointer.restore(model, optimizer, scheduler)
    return RunState(
        config=config,
        context=context,
        manifest=manifest,
        model=model,
        scorer=scorer,
        optimizer=optimizer,
        scheduler=scheduler,
        flop_shape=FlopShape.of(model),
        peak_tflops=config.peak_tflops
        or device_peak_tflops(device, _uses_bf16(config.precision, device)),
        step=start_step,
    )


def _squared_attention_lengths(batch: dict[str, Any], config: TrainConfig) -> int:
    """The attention FLOPs' length term: per sample, or per group under shifted sparse."""
    if config.attention_pattern == "shifted_sparse":
        groups = shifted_sparse_inputs(batch, config.s2_group)["s2_group_ids"]
        return squared_group_lengths(batch, groups)
    return squared_sample_lengths(batch)


def _step(run: RunState) -> StepMetrics:
    """Optimizer step `run.step + 1` over `grad_accum` micro-batches of the stage's stream;
    advances `run.step`."""
    config, context = run.config, run.context
    device = context.device
    sources = run.manifest.source_names
    started = time.perf_counter()
    micro_batches = [_to_device(run.stream.next(), device) for _ in range(config.grad_accum)]
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
        if config.attention_pattern == "shifted_sparse":
            # Only here: validation, eval and generate never receive the groups, so they
            # attend over whole samples.
            batch = {**batch, **shifted_sparse_inputs(batch, config.s2_group)}
        done = micro_step(
            run.scorer,
            batch,
            config.loss,
            denominator,
            precision=_autocast(config.precision, device),
            gradient_scale=context.gradient_scale,
        )
        step_loss += done.loss
        target_sources = done.losses.source_ids.cpu()
        source_sums.index_add_(0, target_sources, done.losses.values.double().cpu())
        source_counts.index_add_(0, target_sources, torch.ones(len(target_sources)).double())
    # Every rank scored different targets: the step's figures are sums over the world.
    for partial_sum in (step_loss, source_sums, source_counts):
        context.all_reduce_sum(partial_sum)
    # The norm is still measured (and logged) when clipping is off: an infinite limit clips nothing.
    clip_to = config.max_grad_norm or float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), clip_to)
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
        grad_norm = grad_norm.full_tensor()
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    elapsed = time.perf_counter() - started

    counts = torch.tensor(
        [
            sum(int((b["sample_ids"] >= 0).sum()) for b in micro_batches),
            sum(int(b["sample_target_counts"].sum()) for b in micro_batches),
            sum(_squared_attention_lengths(b, config) for b in micro_batches),
        ]
    )
    tokens, targets, squared_lengths = context.all_reduce_sum(counts, over="dp").tolist()
    flops = training_flops(run.flop_shape, tokens, targets, squared_lengths)
    achieved = flops / elapsed
    return StepMetrics(
        step=run.step,
        split=run.stage.split,
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
        model_flops=flops,
        model_tflops_per_s=achieved / 1e12,
        mfu=achieved / (run.peak_tflops * 1e12 * context.world_size) if run.peak_tflops else None,
    )


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
    from longdata.trainer.tokenizer import save_build_tokenizer

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
            f"{metrics.target_tokens_per_s:,.0f} target tok/s  "
            f"peak {metrics.peak_memory_mb:,.0f} MB"
        )
        if self._rich is not None:
            self._rich.update(self._task, completed=metrics.step, status=status)
        elif self._enabled and metrics.step % self._config.log_every == 0:
            print(f"step {metrics.step}/{self._config.steps}  {status}", file=sys.stderr)

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()
