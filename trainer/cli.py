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

from longdata.trainer.config import FIELDS, ConfigError, TrainConfig


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


def _options_from_config(names: tuple[str, ...] | None = None) -> list[inspect.Parameter]:
    """One `--option` per `TrainConfig` field (of `names`; None: every field), defaulting to None
    ("not given"), so that the config's own default (shown in --help) applies unless the user
    sets one."""
    from longdata.trainer.config import FIELDS, defaults, value_type

    default_values = defaults()
    parameters = []
    for name, config_field in FIELDS.items():
        if names is not None and name not in names:
            continue
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
    from longdata.trainer.config import resolve

    build = given.pop("build")
    config_file = given.pop("config")
    assignments = given.pop("assignments") or ()
    if build is not None:
        given["build_dir"] = build if "://" in build else str(_resolve_build(Path(build)))
    try:
        config = resolve(config_file, assignments, given)
        if "://" in config.build_dir:
            config = _with_remote_build(config)
        from longdata.trainer.loop import train as run_training

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
    from longdata.trainer.checkpoint import claim_run_dir
    from longdata.trainer.data import fetch_remote_manifest

    url = config.build_dir
    # OUT must be a run directory before the manifest is written into it (the loop checks again).
    out_dir = claim_run_dir(config.out_dir, resuming=bool(config.resume))
    manifest = fetch_remote_manifest(url, out_dir / "remote_build")
    return dataclasses.replace(
        config, build_dir=str(manifest.build_dir), remote=config.remote or url
    )


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
    attention_pattern: Annotated[
        str, typer.Option(help=FIELDS["attention_pattern"].metadata["help"])
    ] = FIELDS["attention_pattern"].default,
    s2_group: Annotated[float, typer.Option(help=FIELDS["s2_group"].metadata["help"])] = FIELDS[
        "s2_group"
    ].default,
    position_span: Annotated[
        int | None, typer.Option(help=FIELDS["position_span"].metadata["help"])
    ] = FIELDS["position_span"].default,
) -> None:
    """Check that packed samples see exactly what they would see alone, for every backend.

    Runs the first --rows rows of the build (no longer than --max-tokens) through the model
    packed, batched together so batch boundaries are checked too, with every attention backend
    available here, and each sample alone with stock attention, at the model's precision and
    in float64. A backend passes when its packed logits and gradients are as close to the
    float64 result as the rounding of the sample run alone (8x it, plus one epsilon): one
    verdict line per backend, then a summary. Exits 1 if a backend fails; refuses in one line
    when the check would not fit the memory available here.
    """
    from longdata.trainer.attention import BACKENDS
    from longdata.trainer.check import check_packing as run_check
    from longdata.trainer.data import Manifest

    settings = TrainConfig(
        build_dir=str(build),
        attention_pattern=attention_pattern,
        s2_group=s2_group,
        position_span=position_span,
    )
    try:
        settings.validate()
    except ConfigError as error:
        raise typer.BadParameter(str(error)) from None
    report = run_check(
        Manifest.read(build),
        model=model,
        split=split,
        rows=rows,
        max_tokens=max_tokens,
        seed=seed,
        s2_group=s2_group if attention_pattern == "shifted_sparse" else None,
        position_span=position_span,
        backends=BACKENDS,
    )
    for line in report.lines():
        typer.echo(line)
    if report.failed:
        raise typer.Exit(code=1)


def plan_memory(**given: Any) -> None:
    """Estimate a training step's device memory, part by part, and the longest row that fits.

    Counts weights, gradients, AdamW state, kept activations, the loss's inputs, one layer's
    working set, the attention workspace and the loss chunk for one device (of an SP group),
    and the attention FLOPs (full and, with --attention-pattern shifted_sparse, LongLoRA's
    groups). The training options mean what they mean for `longdata train`, with its defaults,
    on a bf16 GPU. Leave a few GiB of --device-gib for the CUDA context and allocator slack.
    """
    from longdata.trainer.config import coerce
    from longdata.trainer.planner import StepShape, fit_row, planner_config
    from longdata.trainer.planner import plan_memory as plan

    model, tokens, targets = given.pop("model"), given.pop("tokens"), given.pop("targets")
    device_gib, host_gib = given.pop("device_gib"), given.pop("host_gib")
    try:
        settings = {name: coerce(name, value) for name, value in given.items() if value is not None}
        train_config = TrainConfig(**settings)
        train_config.validate(needs_build=False)
        config = planner_config(model)
        shape = StepShape.from_config(train_config, tokens, targets)
        result = plan(config, shape)
    except (OSError, ValueError) as error:  # ConfigError is a ValueError
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"{model}, {tokens:,}-token row, sp {shape.sp}:\n")
    typer.echo(result.table())
    host_bytes = None if host_gib is None else int(host_gib * 2**30)
    fits, fitted = fit_row(config, shape, int(device_gib * 2**30), host_bytes)
    host = "" if host_gib is None else f" and {host_gib:g} GiB of host"
    typer.echo(f"\nlongest row that fits {device_gib:g} GiB per device{host}: {fits:,} tokens")
    if fitted is not None and fitted.shape.offload_layers is not None:
        typer.echo(
            f"  offloading the first {fitted.shape.offload_layers} layers' checkpoints "
            f"({fitted.host_bytes / 2**30:,.1f} GiB of host), the rest on the device"
        )


def _planner_option(name: str, kind: Any, default: Any, help: str) -> inspect.Parameter:
    option = typer.Option(f"--{name.replace('_', '-')}", help=help)
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[kind, option]
    )


def _plan_memory_signature() -> inspect.Signature:
    """plan-memory's own options (what to plan for, and the memory to fit), then the training
    settings a step's memory depends on, generated from `TrainConfig` like `train`'s."""
    from longdata.trainer.planner import PLANNED_SETTINGS

    return inspect.Signature(
        [
            _planner_option(
                "model",
                str,
                "llama-3.1-8b",
                "llama-3.1-8b (the shape of Llama-3.1-8B), a trainer preset (tiny-llama), or a "
                "local config.json or checkpoint directory.",
            ),
            _planner_option("tokens", int, 65_536, "Row length in tokens."),
            _planner_option(
                "targets", int | None, None, "Target tokens in the row (default: all)."
            ),
            _planner_option("device_gib", float, 80.0, "Device memory to fit, GiB."),
            _planner_option(
                "host_gib",
                float | None,
                None,
                "Host memory the offloaded checkpoints may use, GiB (default: no limit).",
            ),
            *_options_from_config(PLANNED_SETTINGS),
        ]
    )


plan_memory.__signature__ = _plan_memory_signature()  # type: ignore[attr-defined]
