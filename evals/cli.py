"""`longdata eval niah`, `eval ruler` and `eval loss`: parse the options, call `evals`, print.

torch and transformers are imported inside the functions so `longdata --help` starts fast.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from longdata.format.paths import check_directory, claim_directory, replace_file

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


@contextmanager
def _progress(console: Console) -> Iterator[Callable[[str, int], Callable[..., None]]]:
    """A transient rich progress display; yields `track(description, total) -> advance(n=1)`."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:

        def track(description: str, total: int) -> Callable[..., None]:
            task = progress.add_task(description, total=total)
            return lambda n=1: progress.advance(task, n)

        yield track


def _bad_parameter(error) -> typer.BadParameter:
    return typer.BadParameter(str(error), param_hint=error.option)


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
            "(same sentence, other codes); also reports its log-probability. Both also score "
            "each sample's question with no needle at all (a control for the model's prior).",
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
        Path,
        typer.Option(
            help="Output directory: results.csv, results.json, heatmap.png. New, empty, or an "
            "earlier eval's (marked by longdata); anything else is refused."
        ),
    ] = Path("eval/niah"),
) -> None:
    """Needle in a haystack: retrieval accuracy over a grid of context lengths x needle depths.

    Builds one prompt per (length, depth, sample) with the anti-haystack generator: synthetic
    filler (or the --haystack text) with one fact such as "The secret code of the amber
    lantern is 48213." planted at the depth, then the question, in the model's chat template with
    the assistant header appended. A prompt has between length - max(1%, 24 tokens) and length
    tokens, everything counted (template, haystack, question, header). The model answers each
    prompt alone; results go to OUT/results.csv (one line per prompt), OUT/results.json
    (config, accuracy grid, rows, no-needle controls) and OUT/heatmap.png.

    On a CPU, the quickstart model: `longdata eval niah --model runs/quickstart/final
    --lengths 4k,8k,16k --out eval/quickstart`. On a GPU, a real model:
    `longdata eval niah --model meta-llama/Llama-3.1-8B-Instruct --lengths 8k,32k,64k,128k
    --samples-per-cell 5 --attention flash_attn --dtype bf16 --out eval/llama`.
    See docs/EVAL.md.
    """
    from longdata.evals.models import EvalInputError
    from longdata.evals.niah.prompts import parse_depths, parse_lengths
    from longdata.evals.niah.report import grid_table, write_outputs
    from longdata.evals.niah.run import NiahSpec, run_niah_checkpoint

    try:
        length_list = parse_lengths(lengths)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--lengths") from None
    try:
        depth_list = parse_depths(depths)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--depths") from None
    check_directory(out, "eval")  # refused before the model is loaded
    err = Console(stderr=True)
    try:
        spec = NiahSpec(
            tuple(length_list),
            tuple(depth_list),
            samples_per_cell,
            mode,
            max_new_tokens,
            distractors,
            lang,
            seed,
            tuple(str(path) for path in haystack or ()),
        )
        with _progress(err) as track:
            report = run_niah_checkpoint(
                model,
                spec,
                tokenizer=tokenizer,
                attention=attention,
                dtype=dtype,
                device=device,
                track=track,
                warn=lambda message: err.print(f"[yellow]warning[/yellow] {message}"),
            )
    except EvalInputError as error:
        raise _bad_parameter(error) from None
    paths = write_outputs(report, claim_directory(out, "eval"))
    Console().print(grid_table(report))
    seconds = report.config["seconds"]
    counted = f"{len(report.rows)} prompt(s) + {len(report.control_rows or [])} control(s)"
    typer.echo(
        f"{counted} in {seconds['total']:.1f}s (model {seconds['load_model']:.1f}s, "
        f"prompts {seconds['build_prompts']:.1f}s, scoring {seconds['score']:.1f}s)"
    )
    typer.echo("wrote " + ", ".join(str(p) for p in paths.values()))


def eval_ruler(
    model: ModelOption,
    lengths: Annotated[
        str,
        typer.Option(
            help="Context lengths: prompt tokens including the chat template, comma-separated; "
            "k = 1024.",
        ),
    ] = "1k,2k",
    tasks: Annotated[
        str, typer.Option(help="Comma-separated: multikey, multivalue, vartrack, cwe, qa.")
    ] = "multikey,multivalue,vartrack,cwe,qa",
    samples: Annotated[
        int,
        typer.Option(
            min=1,
            help="Independent draws per task; each is asked at every length, so they are what "
            "the standard error is over.",
        ),
    ] = 4,
    max_new_tokens: Annotated[
        int,
        typer.Option(min=1, help="Most tokens to decode per answer (a sentence naming the items)."),
    ] = 80,
    tokenizer: Annotated[
        str | None,
        typer.Option(help="Tokenizer to use instead of the model's own (as for eval niah)."),
    ] = None,
    lang: Annotated[str, typer.Option(help="Filler and question language: en or zh.")] = "en",
    haystack: Annotated[
        list[Path] | None,
        typer.Option(help="Real filler text instead of generated prose (as for eval niah)."),
    ] = None,
    seed: Annotated[
        int,
        typer.Option(
            help="Eval seed. Prompts are drawn in their own namespace (longdata-eval-ruler:SEED),"
            " which no recipe can produce.",
        ),
    ] = 0,
    attention: AttentionOption = "auto",
    dtype: DtypeOption = "auto",
    device: DeviceOption = "auto",
    out: Annotated[
        Path,
        typer.Option(
            help="Output directory: results.csv, results.json, heatmap.png. New, empty, or an "
            "earlier eval's (marked by longdata); anything else is refused."
        ),
    ] = Path("eval/ruler"),
) -> None:
    """RULER-style suite: accuracy per task and length, with a no-signal control per task.

    Tasks: multikey (one code among other subjects' codes and the same subject's spare code),
    multivalue (every code of one subject), vartrack (which variables a chain of assignments
    gives a value), cwe (the 3 most frequent keywords) and qa (a fact from one passage among
    distractor passages). Correct: the greedy answer names every expected item and no
    distractor. Recall (RULER's own metric): the share of the expected items it names. The
    control asks each sample's question with the signal sentences removed; chance is one blind
    guess (at most qa's 1/121). See docs/EVAL.md.
    """
    from longdata.evals.models import EvalInputError
    from longdata.evals.niah.prompts import parse_lengths
    from longdata.evals.ruler.report import task_table, write_outputs
    from longdata.evals.ruler.run import RulerSpec, run_ruler_checkpoint

    try:
        length_list = parse_lengths(lengths)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--lengths") from None
    check_directory(out, "eval")  # refused before the model is loaded
    err = Console(stderr=True)
    try:
        spec = RulerSpec(
            tuple(length_list),
            tuple(t.strip() for t in tasks.split(",") if t.strip()),
            samples,
            max_new_tokens,
            lang,
            seed,
            tuple(str(path) for path in haystack or ()),
        )
        with _progress(err) as track:
            results = run_ruler_checkpoint(
                model,
                spec,
                tokenizer=tokenizer,
                attention=attention,
                dtype=dtype,
                device=device,
                track=track,
            )
    except EvalInputError as error:
        raise _bad_parameter(error) from None
    paths = write_outputs(results, claim_directory(out, "eval"))
    Console().print(task_table(results))
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
        typer.Option(
            help="Also write the report, every sample's loss included, as OUT/loss.json. New, "
            "empty, or an earlier eval's directory (marked by longdata); anything else is refused."
        ),
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
    from longdata.evals.loss import NothingToEvaluate, run_loss
    from longdata.evals.models import EvalInputError
    from longdata.trainer.validation_loss import loss_table

    if out is not None:
        check_directory(out, "eval")  # refused before the model is loaded
    err = Console(stderr=True)
    with _progress(err) as track:

        def on_split(chosen: str, note: str | None, rows: int) -> Callable[[int], None]:
            if note:
                err.print(note, highlight=False)
            return track(f"{chosen} rows", rows)

        try:
            run = run_loss(
                build,
                model,
                split=split,
                batch_size=batch_size,
                attention=attention,
                dtype=dtype,
                device=device,
                on_split=on_split,
            )
        except EvalInputError as error:
            raise _bad_parameter(error) from None
        except NothingToEvaluate as error:
            err.print(f"[red]error[/red] {error}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
    title = f"loss of {model} on {build} ({run.split}, {run.report.rows} rows)"
    Console().print(loss_table(run.report, title))
    typer.echo(f"{run.report.rows} rows, {len(run.report.samples)} samples in {run.seconds:.1f}s")
    if out is not None:
        path = claim_directory(out, "eval") / "loss.json"
        replace_file(path, (json.dumps(run.result, indent=2) + "\n").encode())
        typer.echo(f"wrote {path}")
