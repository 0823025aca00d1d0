"""Command functions registered by `longdata/cli.py` as `longdata train` and `check-packing`.

torch and transformers are imported inside the functions so `longdata --help` starts fast.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

FP32_TOLERANCE = 1e-4
# flash-attn and torch's varlen kernels compute in bf16 even for an fp32 model.
HALF_PRECISION = ("flash_attn", "torch_varlen")
HALF_PRECISION_TOLERANCE = 5e-2


def _resolve_build(build_or_recipe: Path) -> Path:
    """A build directory as given, or the build a recipe.yml produces."""
    if build_or_recipe.suffix in (".yml", ".yaml"):
        try:
            from longdata.build import build
        except ImportError as error:
            raise typer.BadParameter(
                f"{build_or_recipe} is a recipe, but longdata.build is not available ({error})"
            ) from error
        return build(build_or_recipe).out_dir
    return build_or_recipe


def train(
    build: Annotated[
        Path,
        typer.Argument(
            help="A build directory (with manifest.json), or a recipe.yml to build first.",
            exists=True,
        ),
    ],
    model: Annotated[
        str,
        typer.Option(
            help="Preset (tiny-llama, tiny-qwen2, niah-tiny: random init, vocab from the build), "
            "a local Hugging Face checkpoint, or a hub id.",
        ),
    ] = "tiny-llama",
    attention: Annotated[
        str,
        typer.Option(
            help="auto, flash_attn, torch_varlen, flex, sdpa_varlen or sdpa_mask. Every one "
            "keeps packed samples from attending to each other; auto picks the fastest here.",
        ),
    ] = "auto",
    out: Annotated[
        Path, typer.Option(help="Run directory: checkpoints, metrics.jsonl, final/.")
    ] = Path("runs/latest"),
    split: Annotated[str, typer.Option(help="Split to train on, e.g. train or stage1/train.")] = (
        "train"
    ),
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 100,
    batch_size: Annotated[int, typer.Option(help="Packed rows per micro-batch.")] = 1,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.")] = 1,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW).")] = 3e-4,
    warmup_steps: Annotated[int, typer.Option(help="Linear warmup steps before cosine.")] = 10,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay (not on 1-D).")] = 0.0,
    loss: Annotated[
        str,
        typer.Option(
            help="token_mean: every target token counts equally. sequence_mean: every sample "
            "counts equally whatever its length (LongAlign loss weighting).",
        ),
    ] = "token_mean",
    lora: Annotated[bool, typer.Option(help="Train LoRA adapters instead of all weights.")] = (
        False
    ),
    lora_rank: Annotated[int, typer.Option(help="LoRA rank.")] = 8,
    lora_targets: Annotated[
        str, typer.Option(help="Comma-separated module names LoRA adapts.")
    ] = "q_proj,k_proj,v_proj,o_proj",
    train_embeddings_and_norms: Annotated[
        bool, typer.Option(help="With --lora, also train embeddings and norms (LongLoRA).")
    ] = False,
    precision: Annotated[
        str, typer.Option(help="auto (bf16 autocast on a bf16 GPU, else fp32), fp32 or bf16.")
    ] = "auto",
    gradient_checkpointing: Annotated[
        bool, typer.Option(help="Recompute activations in backward to save memory.")
    ] = False,
    compile: Annotated[bool, typer.Option(help="torch.compile the model.")] = False,
    checkpoint_every: Annotated[
        int, typer.Option(help="Save a resumable checkpoint every N steps (0: never).")
    ] = 0,
    resume: Annotated[
        bool, typer.Option(help="Continue exactly from the newest checkpoint in --out.")
    ] = False,
    save: Annotated[
        str, typer.Option(help="Final HF checkpoint in OUT/final: merged, adapter or none.")
    ] = "merged",
    seed: Annotated[int, typer.Option(help="Seed for init, shuffling and everything else.")] = 0,
    remote: Annotated[
        str | None,
        typer.Option(help="Read shards from this URL root (e.g. s3://b/builds/x), cached locally."),
    ] = None,
    threads: Annotated[
        int | None, typer.Option(help="torch intra-op CPU threads (default: torch's choice).")
    ] = None,
    parallel: Annotated[
        str,
        typer.Option(
            help="Under torchrun: ddp (every rank holds the whole model) or fsdp (FSDP2: weights, "
            "gradients and optimizer state sharded across ranks). Ignored in one process.",
        ),
    ] = "ddp",
    sp: Annotated[
        int,
        typer.Option(
            help="Sequence parallelism (Ulysses): split every row along the sequence across "
            "this many ranks; must divide the number of ranks and the model's attention heads.",
        ),
    ] = 1,
) -> None:
    """Train a causal LM on a longdata build without cross-sample attention.

    Streams the build's packed rows, runs AdamW with warmup and cosine decay, logs tokens/s,
    target tokens/s, loss per source and peak memory (OUT/metrics.jsonl), checkpoints so a
    killed run resumes exactly (--checkpoint-every, --resume) and saves a Hugging Face
    checkpoint in OUT/final. With no --model, a tiny random Llama trains on CPU in minutes.

    Multi-GPU / multi-node: launch the same command with torchrun, e.g.
    `torchrun --nproc-per-node 8 -m longdata.cli train BUILD --parallel fsdp --sp 2`;
    --batch-size is then per data-parallel rank and rank 0 alone writes OUT.
    """
    import torch

    from trainer.loop import TrainConfig
    from trainer.loop import train as run_training

    if threads:
        torch.set_num_threads(threads)
    config = TrainConfig(
        build_dir=str(_resolve_build(build)),
        out_dir=str(out),
        model=model,
        attention=attention,
        split=split,
        steps=steps,
        batch_size=batch_size,
        grad_accum=grad_accum,
        lr=lr,
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
        loss=loss,
        lora=lora,
        lora_rank=lora_rank,
        lora_alpha=2 * lora_rank,
        lora_targets=[name.strip() for name in lora_targets.split(",") if name.strip()],
        train_embeddings_and_norms=train_embeddings_and_norms,
        precision=precision,
        gradient_checkpointing=gradient_checkpointing,
        compile=compile,
        checkpoint_every=checkpoint_every,
        resume=resume,
        save=save,
        seed=seed,
        remote=remote,
        parallel=parallel,
        sp=sp,
    )
    result = run_training(config)
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun rank 0 reports for all
    last = result.metrics[-1] if result.metrics else None
    if last is not None:
        typer.echo(
            f"step {last.step}: loss {last.loss:.4f}, {last.target_tokens_per_s:,.0f} target tok/s"
        )
    if result.final_dir is not None:
        typer.echo(f"saved {result.final_dir}")


def check_packing(
    build: Annotated[
        Path, typer.Argument(help="A build directory (with manifest.json).", exists=True)
    ],
    model: Annotated[
        str, typer.Option(help="Preset, local Hugging Face checkpoint, or hub id.")
    ] = "tiny-llama",
    rows: Annotated[int, typer.Option(help="How many rows of the build to check.")] = 2,
    split: Annotated[str, typer.Option(help="Split to read rows from.")] = "train",
    max_tokens: Annotated[
        int, typer.Option(help="Skip rows longer than this (the reference runs eager attention).")
    ] = 4096,
    seed: Annotated[int, typer.Option(help="Seed for a preset model's random init.")] = 0,
) -> None:
    """Check that packed samples see exactly what they would see alone, for every backend.

    Runs the first --rows rows of the build through the model packed (batched together, so
    batch boundaries are checked too) with every attention backend available here, and each
    sample alone with stock attention, then prints the largest logit and gradient difference per
    backend. Exits non-zero if a difference exceeds 1e-4 (5e-2 for the bf16 varlen kernels).
    """
    import torch

    from trainer.attention import BACKENDS
    from trainer.check import check_backends
    from trainer.data import Manifest, make_dataset, release_streaming_resources
    from trainer.model import load_model

    manifest = Manifest.read(build)
    dataset = make_dataset(manifest, split, batch_size=1, shuffle=False)
    try:
        picked = []
        for index in range(dataset.num_samples):
            row = dataset[index]
            if len(row["input_ids"]) <= max_tokens:
                picked.append(row)
            if len(picked) == rows:
                break
    finally:
        del dataset
        release_streaming_resources()
    if not picked:
        raise typer.BadParameter(f"no row of split {split!r} has <= {max_tokens} tokens")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    lm = load_model(model, "sdpa_mask", vocab_size=manifest.vocab_size, seed=seed, device=device)
    typer.echo(f"{len(picked)} rows, samples per row {[len(r['seq_lens']) for r in picked]}")
    failed = False
    for backend, result in check_backends(lm, picked, backends=BACKENDS).items():
        if isinstance(result, str):
            typer.echo(f"{backend:>13}: skipped ({result})")
            continue
        grads = "not checked (no backward)" if result.grads is None else f"{result.grads:.2e}"
        typer.echo(f"{backend:>13}: max |logit diff| {result.logits:.2e}, max |grad diff| {grads}")
        tolerance = HALF_PRECISION_TOLERANCE if backend in HALF_PRECISION else FP32_TOLERANCE
        failed |= max(result.logits, result.grads or 0.0) > tolerance
    if failed:
        raise typer.Exit(code=1)
