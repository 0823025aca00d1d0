"""Command functions registered by `longdata/cli.py` as `longdata train` and `check-packing`.

torch and transformers are imported inside the functions so `longdata --help` starts fast.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from pathlib import Path
from typing import Annotated, Any

import typer

FP32_TOLERANCE = 1e-4
# flash-attn and torch's varlen kernels compute in bf16 even for an fp32 model.
HALF_PRECISION = ("flash_attn", "torch_varlen")
HALF_PRECISION_TOLERANCE = 5e-2


def _resolve_build(build_or_recipe: Path) -> Path:
    """A build directory as given, or the build a recipe.yml produces."""
    if not build_or_recipe.exists():
        raise typer.BadParameter(f"{build_or_recipe} does not exist", param_hint="BUILD")
    if build_or_recipe.suffix in (".yml", ".yaml"):
        try:
            from longdata.build import build
        except ImportError as error:
            raise typer.BadParameter(
                f"{build_or_recipe} is a recipe, but longdata.build is not available ({error})"
            ) from error
        return build(build_or_recipe).out_dir
    return build_or_recipe


def _options_from_config() -> list[inspect.Parameter]:
    """One `--option` per `TrainConfig` field, defaulting to None ("not given"), so that the
    config's own default (shown in --help) applies unless the user sets one."""
    from trainer.config import FIELDS, defaults, value_type

    default_values = defaults()
    parameters = []
    for name, config_field in FIELDS.items():
        flag = config_field.metadata.get("cli", f"--{name.replace('_', '-')}")
        if flag is None:
            continue
        kind, _ = value_type(name)
        if kind is bool:
            flag = f"{flag}/--no-{flag[2:]}"
        default = default_values[name]
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        option = typer.Option(
            flag,
            help=config_field.metadata["help"],
            show_default=False if shown in (None, "") else str(shown),
        )
        # A list field is given comma-separated; TrainConfig's coercion splits it.
        cli_type = kind if kind in (bool, int, float, str) else str
        parameters.append(
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                default=None,
                annotation=Annotated[cli_type | None, option],
            )
        )
    return parameters


def train(**given: Any) -> None:
    """Train a causal LM on a longdata build without cross-sample attention.

    Streams the build's packed rows, runs AdamW with warmup and cosine decay, logs tokens/s,
    target tokens/s, loss per source, FLOPs, MFU and peak memory (OUT/metrics.jsonl, optionally
    TensorBoard or W&B), checkpoints so a killed run resumes exactly (--checkpoint-every,
    --resume) and saves a Hugging Face checkpoint in OUT/final. With no --split, a staged build
    trains its stages in order (a context-length curriculum). With no --model, a tiny random
    Llama trains on CPU in minutes.

    Settings layer, later wins: defaults, --config train.yml, --set key=value, options; the
    resolved config is saved as OUT/config.json (which --config reads back).

    Multi-GPU / multi-node: launch the same command with torchrun, e.g.
    `torchrun --nproc-per-node 8 -m longdata.cli train BUILD --parallel fsdp --sp 2`;
    --batch-size is then per data-parallel rank and rank 0 alone writes OUT.
    """
    from trainer.config import ConfigError, resolve

    build = given.pop("build")
    config_file = given.pop("config")
    assignments = given.pop("assignments") or ()
    if build is not None:
        given["build_dir"] = build if "://" in build else str(_resolve_build(Path(build)))
    try:
        config = resolve(config_file, assignments, given)
        if "://" in config.build_dir:
            config = _with_remote_build(config)
        from trainer.loop import train as run_training

        result = run_training(config)
    except ConfigError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun rank 0 reports for all
    last = result.metrics[-1] if result.metrics else None
    if last is not None:
        typer.echo(
            f"step {last.step}: loss {last.loss:.4f}, {last.target_tokens_per_s:,.0f} target tok/s"
        )
    if result.final_dir is not None:
        typer.echo(f"saved {result.final_dir}")


def _with_remote_build(config):
    """The config of a run on a build's URL: its manifest downloaded into OUT/remote_build (the
    run's build directory), its shards streamed from the URL and cached there."""
    from trainer.data import fetch_remote_manifest

    url = config.build_dir
    manifest = fetch_remote_manifest(url, Path(config.out_dir) / "remote_build")
    return dataclasses.replace(config, build_dir=str(manifest.build_dir), remote=config.remote or url)


train.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [
        inspect.Parameter(
            "build",
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            default=None,
            annotation=Annotated[
                str | None,
                typer.Argument(
                    help="A build directory (with manifest.json), a recipe.yml to build first, "
                    "or a build's URL (s3://bucket/path, ...): its manifest is read there and "
                    "its shards stream from there, cached under OUT/remote_build. May come from "
                    "--config (build_dir) instead.",
                    show_default=False,
                ),
            ],
        ),
        inspect.Parameter(
            "config",
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[
                Path | None,
                typer.Option(
                    "--config",
                    help="A YAML (or JSON) file of settings: the field names below with "
                    "underscores, e.g. `lora_rank: 16`.",
                    show_default=False,
                ),
            ],
        ),
        inspect.Parameter(
            "assignments",
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[
                list[str] | None,
                typer.Option(
                    "--set",
                    help="key=value (value read as YAML), over --config; repeatable.",
                    show_default=False,
                ),
            ],
        ),
        *_options_from_config(),
    ]
)


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
        int, typer.Option(help="Skip rows longer than this (every sample is also run alone).")
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


def plan_memory(
    model: Annotated[
        str,
        typer.Option(
            help="llama-3.1-8b (the shape of Llama-3.1-8B), a trainer preset (tiny-llama), or a "
            "local config.json or checkpoint directory.",
        ),
    ] = "llama-3.1-8b",
    tokens: Annotated[int, typer.Option(help="Row length in tokens.")] = 65_536,
    targets: Annotated[
        int | None, typer.Option(help="Target tokens in the row (default: all).")
    ] = None,
    lora: Annotated[bool, typer.Option(help="LoRA adapters instead of all weights.")] = False,
    lora_rank: Annotated[int, typer.Option(help="LoRA rank.")] = 8,
    precision: Annotated[str, typer.Option(help="fp32, or bf16 autocast.")] = "bf16",
    weights: Annotated[
        str,
        typer.Option(
            help="fp32 (what longdata train loads today) or bf16 (halves the weights and the "
            "residual stream, as ArcticTraining runs)."
        ),
    ] = "fp32",
    sp: Annotated[int, typer.Option(help="Sequence-parallel degree (Ulysses).")] = 1,
    attention: Annotated[
        str, typer.Option(help="varlen (flash_attn, torch_varlen, sdpa_varlen) or dense.")
    ] = "varlen",
    gradient_checkpointing: Annotated[bool, typer.Option(help="Per-layer checkpointing.")] = True,
    tiled_loss: Annotated[bool, typer.Option(help="Loss over chunks of targets.")] = True,
    loss_chunk_tokens: Annotated[int, typer.Option(help="Targets per loss chunk.")] = 2048,
    tiled_mlp: Annotated[bool, typer.Option(help="MLP over chunks of tokens.")] = False,
    mlp_chunk_tokens: Annotated[int, typer.Option(help="Tokens per MLP chunk.")] = 8192,
    offload_activations: Annotated[
        bool, typer.Option(help="Checkpointed hidden states in host memory.")
    ] = False,
    device_gib: Annotated[float, typer.Option(help="Device memory to fit, GiB.")] = 80.0,
) -> None:
    """Estimate a training step's device memory, part by part, and the longest row that fits.

    Counts weights, gradients, AdamW state, kept activations, one layer's working set, the
    attention workspace and the loss chunk for one device (of an SP group). Leave a few GiB of
    --device-gib for the CUDA context and allocator slack.
    """
    from dataclasses import replace

    from trainer.planner import StepShape, longest_row, planner_config
    from trainer.planner import plan_memory as plan

    try:
        config = planner_config(model)
        shape = StepShape(
            row_tokens=tokens,
            target_tokens=targets,
            lora=lora,
            lora_rank=lora_rank,
            precision=precision,
            weights=weights,
            sp=sp,
            attention=attention,
            gradient_checkpointing=gradient_checkpointing,
            tiled_loss=tiled_loss,
            loss_chunk_tokens=loss_chunk_tokens,
            tiled_mlp=tiled_mlp,
            mlp_chunk_tokens=mlp_chunk_tokens,
            offload_activations=offload_activations,
        )
    except (OSError, ValueError) as error:
        raise typer.BadParameter(str(error)) from None
    result = plan(config, shape)
    typer.echo(f"{model}, {tokens:,}-token row, sp {sp}:\n")
    typer.echo(result.table())
    fits = longest_row(config, replace(shape, target_tokens=targets), int(device_gib * 2**30))
    typer.echo(f"\nlongest row that fits {device_gib:g} GiB per device: {fits:,} tokens")


# ---------------------------------------------------------------------------------------------
# longdata eval niah / longdata eval loss

DTYPES = ("auto", "fp32", "bf16", "fp16")

ModelOption = Annotated[
    str,
    typer.Option(
        "--model",
        help="A local Hugging Face checkpoint (e.g. runs/quickstart/final, written by `longdata "
        "train`) or a hub id such as meta-llama/Llama-3.1-8B-Instruct.",
    ),
]
AttentionOption = Annotated[
    str,
    typer.Option(
        help="auto, flash_attn, torch_varlen, flex, sdpa_varlen or sdpa_mask: the packing-aware "
        "backend for full-length forward passes (auto: flash_attn on a GPU with flash-attn, "
        "sdpa_varlen on a CPU).",
    ),
]
DtypeOption = Annotated[
    str, typer.Option(help="auto (bf16 on a GPU that has it, else fp32), fp32, bf16 or fp16.")
]
DeviceOption = Annotated[
    str, typer.Option(help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
]


def _resolve_device_and_dtype(device: str, dtype: str):
    import torch

    if dtype not in DTYPES:
        raise typer.BadParameter(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if dtype == "auto":
        use_bf16 = resolved.type == "cuda" and torch.cuda.is_bf16_supported()
        dtype = "bf16" if use_bf16 else "fp32"
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    return resolved, torch_dtype, dtype


def _load_eval_model(model: str, attention: str, device: str, dtype: str):
    from trainer.model import PRESETS, load_model

    if model in PRESETS:
        raise typer.BadParameter(
            f"{model} is a random-init preset; evaluate a trained checkpoint (e.g. OUT/final "
            "from `longdata train`) or a hub id",
            param_hint="--model",
        )
    torch_device, torch_dtype, dtype_name = _resolve_device_and_dtype(device, dtype)
    try:
        lm = load_model(model, attention, dtype=torch_dtype, device=torch_device)
    except (OSError, ValueError) as error:
        raise typer.BadParameter(f"cannot load {model}: {error}", param_hint="--model") from None
    lm.eval()
    return lm, str(torch_device), dtype_name


def eval_niah(
    model: ModelOption,
    lengths: Annotated[
        str,
        typer.Option(
            help="Context lengths: prompt tokens including the chat template, comma-separated; "
            "k = 1024 (4k = 4,096 tokens, 128k = 131,072).",
        ),
    ] = "4k,8k,16k",
    depths: Annotated[
        str,
        typer.Option(
            help="Needle depths: where the needle starts, as a fraction of the haystack "
            "(0 = first sentence, 1 = after the last); also 25% style.",
        ),
    ] = "0,0.25,0.5,0.75,1.0",
    samples_per_cell: Annotated[
        int,
        typer.Option(
            min=1,
            help="Prompts per (length, depth) cell, each with its own needle and filler; "
            "accuracy per cell is a mean over them.",
        ),
    ] = 1,
    mode: Annotated[
        str,
        typer.Option(
            help="generate: greedy answer, correct iff it contains the needle's code. loglik: "
            "correct iff the reference answer is more likely than every distractor answer "
            "(same sentence, other codes); also reports its log-probability, and how often "
            "the reference wins with no needle at all (a control for the model's prior).",
        ),
    ] = "generate",
    max_new_tokens: Annotated[
        int, typer.Option(min=1, help="generate: most tokens to decode per answer.")
    ] = 32,
    distractors: Annotated[
        int, typer.Option(min=1, help="loglik: distractor answers per prompt.")
    ] = 4,
    tokenizer: Annotated[
        str | None,
        typer.Option(
            help="Tokenizer to use instead of the model's own: a directory, a hub id, or the "
            "build directory the model was trained on.",
        ),
    ] = None,
    lang: Annotated[str, typer.Option(help="Haystack and question language: en or zh.")] = "en",
    haystack: Annotated[
        list[Path] | None,
        typer.Option(
            help="Real filler text instead of generated prose (repeatable): a text file, a "
            "directory of them, or JSONL/Parquet with a text field; read in order from a "
            "seeded start, needles still planted at the requested depth.",
        ),
    ] = None,
    seed: Annotated[
        int,
        typer.Option(
            help="Eval seed. Prompts are drawn in their own namespace (longdata-eval-niah:SEED), "
            "which no recipe's anti-haystack source can produce.",
        ),
    ] = 0,
    attention: AttentionOption = "auto",
    dtype: DtypeOption = "auto",
    device: DeviceOption = "auto",
    out: Annotated[
        Path, typer.Option(help="Output directory: results.csv, results.json, heatmap.png.")
    ] = Path("eval/niah"),
) -> None:
    """Needle in a haystack: retrieval accuracy over a grid of context lengths x needle depths.

    Builds one prompt per (length, depth, sample) with the anti-haystack generator: synthetic
    filler with one fact such as "The secret code of the amber lantern is 48213." planted at
    the depth, then the question, in the model's chat template with the assistant header
    appended. A prompt has between length - max(1%, 24 tokens) and length tokens, everything
    counted (template, haystack, question, header). The model answers each prompt alone;
    results go to OUT/results.csv (one line per prompt), OUT/results.json (config, accuracy
    grid, rows) and OUT/heatmap.png.

    On a CPU, the quickstart model: `longdata eval niah --model runs/quickstart/final
    --lengths 4k,8k,16k --out eval/quickstart`. On a GPU, a real model:
    `longdata eval niah --model meta-llama/Llama-3.1-8B-Instruct --lengths 8k,32k,64k,128k
    --samples-per-cell 5 --attention flash_attn --dtype bf16 --out eval/llama`.
    See docs/EVAL.md.
    """
    import time

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from longdata.niah import build_controls, build_grid, parse_depths, parse_lengths
    from trainer.niah import (
        MODES,
        GenerateScorer,
        LoglikScorer,
        evaluate,
        grid_table,
        write_outputs,
    )
    from trainer.tokenizer import TokenizerUnavailable, load_model_tokenizer

    started = time.perf_counter()
    try:
        length_list = parse_lengths(lengths)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--lengths") from None
    try:
        depth_list = parse_depths(depths)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--depths") from None
    if mode not in MODES:
        raise typer.BadParameter(f"choose from {', '.join(MODES)}", param_hint="--mode")
    if lang not in ("en", "zh"):
        raise typer.BadParameter("choose en or zh", param_hint="--lang")
    filler = None
    if haystack:
        from longdata.sources.antihaystack import Haystack

        try:
            filler = Haystack.from_paths(haystack)
        except (FileNotFoundError, ValueError) as error:
            raise typer.BadParameter(str(error), param_hint="--haystack") from None
        if lang not in filler.languages:
            raise typer.BadParameter(f"it has no {lang} text", param_hint="--haystack")
    try:
        tok = load_model_tokenizer(model, tokenizer)
    except TokenizerUnavailable as error:
        raise typer.BadParameter(str(error), param_hint="--tokenizer") from None

    err = Console(stderr=True)
    # The model first: a wrong --model should fail before minutes of prompt building.
    lm, device_name, dtype_name = _load_eval_model(model, attention, device, dtype)
    context = getattr(lm.config, "max_position_embeddings", None)
    if context and max(length_list) > context:
        err.print(
            f"[yellow]warning[/yellow] lengths up to {max(length_list):,} tokens exceed the "
            f"model's max_position_embeddings ({context:,})"
        )
    loaded = time.perf_counter()

    total = len(length_list) * len(depth_list) * samples_per_cell
    columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task("building prompts", total=total)
        try:
            prompts = build_grid(
                tok, length_list, depth_list, samples_per_cell, seed=seed, lang=lang,
                distractors=distractors, on_prompt=lambda _: progress.advance(task),
                haystack=filler,
            )
        except ValueError as error:
            raise typer.BadParameter(str(error), param_hint="--lengths") from None
    vocab = lm.get_input_embeddings().num_embeddings
    if max(max(p.prompt_ids) for p in prompts) >= vocab:
        raise typer.BadParameter(
            f"the tokenizer produces ids beyond the model's {vocab}-token embedding: wrong "
            "tokenizer for this model",
            param_hint="--tokenizer",
        )
    built = time.perf_counter()

    if mode == "generate":
        scorer = GenerateScorer(lm, tok, max_new_tokens=max_new_tokens)
    else:
        scorer = LoglikScorer(lm)
    config = {
        "model": model,
        "tokenizer": tokenizer or model,
        "mode": mode,
        "lengths": length_list,
        "depths": depth_list,
        "samples_per_cell": samples_per_cell,
        "seed": seed,
        "seed_namespace": f"longdata-eval-niah:{seed}",
        "lang": lang,
        "haystack": [str(path) for path in haystack] if haystack else None,
        "max_new_tokens": max_new_tokens if mode == "generate" else None,
        "distractors": distractors if mode == "loglik" else None,
        "chance_accuracy": 1 / (1 + distractors) if mode == "loglik" else None,
        "attention": attention,
        "dtype": dtype_name,
        "device": device_name,
        "context_length": "prompt tokens: chat template + haystack + question + assistant header",
        "depth": "needle start / haystack characters; requested and measured per row",
        "correct": (
            "every expected code appears in the greedy output as a whole number"
            if mode == "generate"
            else "log p(reference answer) > log p(each distractor answer)"
        ),
    }
    controls = []
    if mode == "loglik":
        controls = build_controls(
            tok, length_list[0], samples_per_cell, seed=seed, lang=lang, distractors=distractors,
            haystack=filler,
        )
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task(f"scoring ({mode})", total=len(prompts) + len(controls))
        report = evaluate(
            prompts,
            scorer,
            length_list,
            depth_list,
            config,
            on_row=lambda _: progress.advance(task),
        )
        if controls:
            report.control_rows = evaluate(
                controls, scorer, length_list[:1], [0.5], on_row=lambda _: progress.advance(task)
            ).rows
    finished = time.perf_counter()
    report.config["seconds"] = {
        "load_model": round(loaded - started, 2),
        "build_prompts": round(built - loaded, 2),
        "score": round(finished - built, 2),
        "total": round(finished - started, 2),  # before writing the outputs
    }
    paths = write_outputs(report, out)
    Console().print(grid_table(report))
    seconds = report.config["seconds"]
    counted = f"{len(prompts)} prompt(s)" + (f" + {len(controls)} control(s)" if controls else "")
    typer.echo(
        f"{counted} in {seconds['total']:.1f}s (model {seconds['load_model']:.1f}s, "
        f"prompts {seconds['build_prompts']:.1f}s, scoring {seconds['score']:.1f}s)"
    )
    typer.echo("wrote " + ", ".join(str(p) for p in paths.values()))


def eval_loss(
    build: Annotated[
        Path, typer.Argument(help="A build directory (with manifest.json).", exists=True)
    ],
    model: ModelOption,
    split: Annotated[
        str | None,
        typer.Option(
            help="Split to evaluate (default: validation, or the first stage's "
            "<stage>/validation in a staged build).",
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Packed rows per forward pass.")] = 1,
    attention: AttentionOption = "auto",
    dtype: DtypeOption = "auto",
    device: DeviceOption = "auto",
    out: Annotated[
        Path | None,
        typer.Option(help="Write the report as JSON: a .json file, or a directory (loss.json)."),
    ] = None,
) -> None:
    """Validation loss per source, per length bucket and overall.

    Reads every row of the split once (every stream, no sampling), runs it packed exactly as in
    training (samples never attend to each other) and averages the next-token loss over target
    tokens (the assistant's text and end-of-turn). Reports the token mean (every target token
    counts once), the sequence mean (every sample counts once: LongAlign's weighting) and
    perplexity for: all samples, each source, each stream (row length bucket, e.g. le_016384)
    and each sample-length bucket (e.g. 8K-16K: more than 8,192 and at most 16,384 tokens).
    """
    import json
    import time

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from trainer.data import Manifest
    from trainer.validation_loss import default_split, evaluate_loss, loss_table, split_rows

    started = time.perf_counter()
    err = Console(stderr=True)
    try:
        manifest = Manifest.read(build)
    except (FileNotFoundError, ValueError) as error:
        raise typer.BadParameter(str(error), param_hint="BUILD") from None
    splits = manifest.split_names
    if split is None:
        split = default_split(manifest)
        if split is None:
            err.print(
                f"[red]error[/red] {build} has no validation split (the recipe's validation "
                "held out nothing, e.g. validation.fraction: 0 or too few samples); pass --split "
                f"with one of: {', '.join(splits)}",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(1)
        others = [s for s in splits if s.endswith("validation") and s != split]
        note = f" (also in the build: {', '.join(others)})" if others else ""
        err.print(f"split: {split}{note}", highlight=False)
    elif split not in splits:
        raise typer.BadParameter(f"no split {split!r}; the build has {', '.join(splits)}")
    rows = split_rows(manifest, split)
    if rows == 0:
        err.print(
            f"[red]error[/red] split {split} of {build} has no rows: nothing to evaluate",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(1)

    lm, device_name, dtype_name = _load_eval_model(model, attention, device, dtype)
    vocab = lm.get_input_embeddings().num_embeddings
    if vocab < manifest.vocab_size:
        raise typer.BadParameter(
            f"the model's embedding has {vocab} tokens but the build's tokenizer has "
            f"{manifest.vocab_size}: not a model for this build",
            param_hint="--model",
        )
    columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task(f"{split} rows", total=rows)
        report = evaluate_loss(
            lm,
            manifest,
            split,
            batch_size=batch_size,
            on_rows=lambda n: progress.advance(task, n),
        )
    seconds = time.perf_counter() - started
    title = f"loss of {model} on {build} ({split}, {report.rows} rows)"
    Console().print(loss_table(report, title))
    typer.echo(f"{report.rows} rows, {len(report.samples)} samples in {seconds:.1f}s")
    if out is not None:
        path = out if out.suffix == ".json" else out / "loss.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        result = {
            "build": str(build),
            "model": model,
            "attention": attention,
            "dtype": dtype_name,
            "device": device_name,
            "seconds": round(seconds, 2),
            **report.as_dict(),
        }
        path.write_text(json.dumps(result, indent=2) + "\n")
        typer.echo(f"wrote {path}")
