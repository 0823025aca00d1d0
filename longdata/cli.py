"""The ``longdata`` command line: parse, call one function per command, print.

Every command runs inside one error boundary (``_Commands.invoke``): an exception becomes one
line on stderr and an exit code (2: the input was wrong; 1: something failed at run time), and
``--debug`` anywhere on the command line, or ``LONGDATA_DEBUG=1``, shows the traceback instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

try:  # typer 0.2x vendors click: its usage errors are not click's own classes
    from typer._click.exceptions import ClickException as _VendoredClickException
except ImportError:
    _VendoredClickException = click.ClickException
USAGE_ERRORS = (click.ClickException, _VendoredClickException)

DEBUG_FLAG = "--debug"
MAX_ERROR_CHARS = 2000  # a message quoting huge input stays a readable line


def exit_code_for(error: BaseException) -> int:
    """2 for input the user can fix, 1 for a failure while running. An error type says which
    with an ``exit_code`` attribute; otherwise a ValueError or a path that does not exist is the
    user's, anything else (disk full, read-only, a bug) a runtime failure."""
    code = getattr(error, "exit_code", None)
    if isinstance(code, int):
        return code
    if isinstance(error, FileNotFoundError | NotADirectoryError | IsADirectoryError | ValueError):
        return 2
    return 1


def error_line(error: BaseException) -> str:
    """The error as one line: its message's lines joined, bounded in length; the type is named
    when it is not one longdata raises on purpose."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = "; ".join(lines) or type(error).__name__
    if not (hasattr(error, "exit_code") or isinstance(error, ValueError | OSError)):
        text = (
            f"{type(error).__name__}: {text} (unexpected: run with {DEBUG_FLAG} for the traceback)"
        )
    if len(text) > MAX_ERROR_CHARS:
        text = f"{text[:MAX_ERROR_CHARS]}… ({len(text) - MAX_ERROR_CHARS:,} more characters)"
    return text


class _Commands(TyperGroup):
    """The root command group, and the one place failures of every command are reported."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if DEBUG_FLAG in args:
            ctx.meta["debug"] = True
            args = [arg for arg in args if arg != DEBUG_FLAG]
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except USAGE_ERRORS as error:  # a bad option or argument
            if _debugging(ctx):
                raise
            where = f" (see {error.ctx.command_path} --help)" if getattr(error, "ctx", None) else ""
            _report(f"{error.format_message()}{where}")
            raise typer.Exit(error.exit_code) from None
        except Exception as error:
            if _debugging(ctx):
                raise
            _report(error_line(error))
            raise typer.Exit(exit_code_for(error)) from None


def _debugging(ctx: click.Context) -> bool:
    return bool(ctx.meta.get("debug")) or os.environ.get("LONGDATA_DEBUG", "") not in ("", "0")


def _report(line: str) -> None:
    console.print(
        Text.assemble(("error", "red"), " ", " ".join(line.split())),
        highlight=False,
        soft_wrap=True,
    )


def _typer(help: str, **kwargs) -> typer.Typer:
    return typer.Typer(
        help=help,
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode="markdown",
        **kwargs,
    )


app = _typer(
    "Build packed long-context fine-tuning datasets and train on them.\n\n"
    "Typical use: `longdata validate recipe.yml`, `longdata build recipe.yml`, look at the data "
    "with `longdata inspect build/<name>` and its card (`build/<name>/README.md`), then "
    "`longdata train build/<name>` and `longdata eval niah --model runs/<run>/final`.\n\n"
    f"A failure prints one line (exit code 2: fix the input; 1: it failed while running); add "
    f"`{DEBUG_FLAG}` to any command, or set LONGDATA_DEBUG=1, to see the traceback.",
    cls=_Commands,
)
console = Console(stderr=True)

RecipeArg = typer.Argument(..., exists=False, help="Path to a recipe YAML file (see recipes/).")
SetOption = typer.Option(
    None,
    "--set",
    metavar="KEY.PATH=VALUE",
    help="Override a recipe field, e.g. --set packing.max_seq_len=16384 --set sources[1].weight=2. "
    "Values are parsed as YAML. Repeatable.",
)


def _load(recipe: Path, overrides: list[str] | None):
    from longdata.recipe import RecipeError, load_recipe

    try:
        return load_recipe(recipe, overrides or [])
    except RecipeError as exc:
        _print_problems(exc)
        raise typer.Exit(2) from None


def _print_problems(exc) -> None:
    for problem in exc.problems:
        console.print(f"[red]error[/red] {escape(problem)}", highlight=False, soft_wrap=True)


@app.command()
def validate(recipe: Path = RecipeArg, overrides: list[str] | None = SetOption) -> None:
    """Check a recipe without doing any work: every wrong key is reported with its path, exit
    code 2. Everything build would refuse is checked here, the tokenizer's template overhead
    included when the tokenizer is local."""
    from longdata.recipe import RecipeError, check_against_tokenizer

    loaded = _load(recipe, overrides)
    try:
        check_against_tokenizer(loaded)
    except RecipeError as exc:
        _print_problems(exc)
        raise typer.Exit(2) from None
    console.print(
        f"[green]ok[/green] {recipe}: recipe '{loaded.name}' with {len(loaded.sources)} sources, "
        f"rows up to {loaded.longest_seq_len:,} tokens, output {loaded.output.dir}"
    )


@app.command()
def build(
    recipe: Path = RecipeArg,
    # A string, not a Path: Path("s3://b/x") would collapse the URL to "s3:/b/x".
    out: str | None = typer.Option(
        None,
        "--out",
        help="Output directory or URL such as s3://bucket/path (default: the recipe's output.dir).",
    ),
    overrides: list[str] | None = SetOption,
    strict: bool = typer.Option(
        False, "--strict", help="Fail if any source row had to be quarantined."
    ),
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        help="Replace an existing output directory that is not a longdata build (refused "
        "otherwise). Never the working directory, a parent of it, the home directory, or a "
        "directory holding the recipe's sources, cache or card directory.",
    ),
    allow_empty: bool = typer.Option(
        False,
        "--allow-empty",
        help="Publish a build that holds no training row (by default it fails).",
    ),
    engine: str = typer.Option(
        "local",
        "--engine",
        help="local: every stage in this process. ray: tokenize and write "
        "tasks on a Ray cluster (pip install 'longdata[ray]'); the rows, "
        "manifest and card equal a local build's.",
    ),
    ray_address: str | None = typer.Option(
        None,
        "--ray-address",
        metavar="auto|HOST:PORT",
        help="With --engine ray: the cluster to join (auto: the one `ray start` runs here). "
        "Default: start a Ray instance on this machine for the build.",
    ),
) -> None:
    """Build MDS shards, a manifest and a data card from a recipe.

    Stages: read -> normalise -> tokenize (cached per source partition) -> mix -> plan -> write
    -> merge -> manifest + card. The build appears at its output directory only once complete;
    malformed input rows are written to <out>/quarantine/<source>.jsonl with their location and
    reason. The card is also copied to <card_dir>/<name> for the recipe as written; with --out or
    --set it is copied only when --set output.card_dir=... says where (so a variant never
    replaces the default build's tracked card).
    """
    from longdata.build import build as run_build
    from longdata.executors import ENGINES, make_executor

    if engine not in ENGINES:
        raise typer.BadParameter(
            f"must be one of {', '.join(ENGINES)}, got {engine!r}", param_hint="'--engine'"
        )
    loaded = _load(recipe, overrides)
    executor = make_executor(engine, ray_address=ray_address)
    try:
        result = run_build(
            loaded,
            out=out,
            strict=strict,
            overwrite=overwrite,
            allow_empty=allow_empty,
            copy_card_to_card_dir=_copies_card(out, overrides or []),
            console=console,
            executor=executor,
        )
    finally:
        executor.close()
    _print_summary(result)


def _copies_card(out: str | None, overrides: list[str]) -> bool:
    """Whether a build's card goes to <card_dir>/<name>: for the recipe as written, or where
    ``--set output.card_dir`` names."""
    set_keys = {assignment.partition("=")[0].strip() for assignment in overrides}
    return "output.card_dir" in set_keys or (out is None and not set_keys)


def _print_summary(result) -> None:
    manifest = result.manifest
    table = Table(title=f"{manifest.name} -> {result.out_dir}", title_justify="left")
    for column in ("split", "stream", "rows", "tokens", "target tokens", "fill", "rows/bound"):
        table.add_column(column, justify="left" if column in ("split", "stream") else "right")
    for name, split in manifest.splits.items():
        for stream in split.streams:
            table.add_row(
                name,
                stream.name,
                f"{stream.rows:,}",
                f"{stream.tokens:,}",
                f"{stream.target_tokens:,}",
                f"{split.packing.fill:.2%}",
                f"{split.packing.rows_over_bound:.3f}",
            )
    console.print(table)
    sources = Table(title="sources", title_justify="left")
    for column in (
        "source",
        "read",
        "quarantined",
        "samples",
        "duplicates",
        "tokens",
        "train tokens",
    ):
        sources.add_column(column, justify="left" if column == "source" else "right")
    for s in manifest.sources:
        sources.add_row(
            s.name,
            f"{s.tokenize.rows_read:,}",
            f"{s.tokenize.quarantined:,}",
            f"{s.tokenize.samples:,}",
            f"{s.mix.duplicates:,}",
            f"{s.tokenize.tokens:,}",
            f"{s.mix.train_tokens:,}",
        )
    console.print(sources)
    console.print("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items()))


@app.command()
def verify(
    build_dir: Path = typer.Argument(..., help="A build directory (holds manifest.json)."),
) -> None:
    """Re-read every shard of a build: hashes and sizes against each index.json, every row against
    the row contract (docs/ROW_SCHEMA.md), and all totals against manifest.json. Exit code 1 on any
    problem, each reported with its shard and row. Safe to run on builds someone else made: shards
    whose columns are not longdata's row schema are refused before decoding, no code from a build
    is run, and nothing is written."""
    from longdata.tools.verify import verify_build

    report = verify_build(build_dir)
    for problem in report.problems:
        console.print(f"[red]corrupt[/red] {escape(problem)}", highlight=False, soft_wrap=True)
    if not report.ok:
        raise typer.Exit(1)
    console.print(
        f"[green]ok[/green] {build_dir}: {report.shards} shards, {report.rows:,} rows, "
        f"{report.tokens:,} tokens verified"
    )


@app.command()
def card(
    build_dir: Path = typer.Argument(..., help="A finished build directory (holds manifest.json)."),
    copy_to: Path | None = typer.Option(
        None,
        help="Also write the card here with its plots beside it, e.g. data_cards/<name>. "
        "Default: <card_dir>/<name> from the build's recipe, as the build does.",
    ),
    copy: bool = typer.Option(True, help="--no-copy: regenerate only the card inside the build."),
) -> None:
    """Regenerate a build's data card (README.md with YAML front matter, plots in card/) from its
    manifest and sample indexes: sources, mix, languages, lengths, packing, loss-weight skew.
    The copy goes only into a new directory or a card directory longdata wrote."""
    from longdata.tools.card import regenerate_card

    for path in regenerate_card(build_dir, copy_to=copy_to, copy=copy):
        console.print(f"wrote {path}", highlight=False, soft_wrap=True)


@app.command()
def inspect(
    build_dir: Path = typer.Argument(..., help="A build directory (holds manifest.json)."),
    split: str | None = typer.Option(
        None, "--split", help="Default: the first train split (of the first curriculum stage)."
    ),
    stream: str | None = typer.Option(
        None,
        "--stream",
        help="A bucket stream of the split, e.g. le_016384. Default: its first "
        "stream with rows (with --sample-id: any stream).",
    ),
    row: int | None = typer.Option(None, "--row", help="Row number inside the stream (default 0)."),
    sample_id: str | None = typer.Option(
        None,
        "--sample-id",
        metavar="SOURCE:POSITION",
        help="Show the row holding this sample (looked up in `<split>/samples.parquet`; with no "
        "--split, in the first split that packs it, stages in order, train first); says "
        "why when it was not packed.",
    ),
    context: int = typer.Option(
        100,
        "--context",
        metavar="N",
        help="Tokens kept at each end of a long non-target run before eliding its middle "
        "(0: only the targets). Target runs are elided only when huge: they keep 10x as "
        "many, at least 1,000, at each end.",
    ),
    full: bool = typer.Option(False, "--full", help="Show every token: no elision."),
    as_json: bool = typer.Option(
        False, "--json", help="Print the row as JSON (segments per sample)."
    ),
    plain: bool = typer.Option(
        False,
        "--plain",
        help="No colour: targets wrapped in ⟦…⟧ (also the default when colour "
        "is off: a pipe, NO_COLOR).",
    ),
) -> None:
    """Show one packed row: each sample's boundaries, id, source, length and status, and its text
    with target (loss) tokens highlighted and the rest dimmed; long runs are elided in the middle
    with a count. The fastest way to see a chat-template or loss-mask bug.

    Exit code 2 for a bad build, split, stream, row or sample id; 1 when the sample was not packed
    (the reason is printed) or a shard is corrupt."""
    import json as json_module

    from longdata.format import ShardError
    from longdata.tools.inspection import (
        InspectError,
        NotPacked,
        inspect_row,
        render,
        render_not_packed,
    )

    out = Console(color_system=None, highlight=False) if plain else Console(highlight=False)
    try:
        view = inspect_row(
            build_dir,
            split=split,
            stream=stream,
            row=row,
            sample_id=sample_id,
            context=context,
            full=full,
        )
    except InspectError as exc:  # the message may quote user input: no markup in it
        console.print(Text.assemble(("error", "red"), f" {exc}"), highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except NotPacked as exc:
        if as_json:
            typer.echo(json_module.dumps(exc.report, ensure_ascii=False, indent=1))
        else:
            render_not_packed(exc.report, out)
        raise typer.Exit(1) from None
    except ShardError as exc:
        console.print(Text.assemble(("corrupt", "red"), f" {exc}"), highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json_module.dumps(view.as_dict(), ensure_ascii=False, indent=1))
        return
    render(view, out, plain=True if plain else None)


@app.command()
def export(
    build_dir: Path = typer.Argument(..., help="A build directory (holds manifest.json)."),
    out: Path = typer.Option(
        ..., "--out", help="Output directory: missing, empty, or an earlier export."
    ),
    format: str = typer.Option(
        "parquet",
        "--format",
        help="parquet (OUT/SPLIT.parquet) or hf "
        "(a datasets.load_from_disk dataset, one split per build split).",
    ),
    split: str | None = typer.Option(
        None, "--split", help="Export only this split (default: all)."
    ),
    with_labels: bool = typer.Option(
        False,
        "--with-labels",
        help="Add labels (-100 outside targets and "
        "at every sample's first token) and position_ids (restarting at "
        "every sample).",
    ),
    push_to_hub: str | None = typer.Option(
        None,
        "--push-to-hub",
        metavar="REPO",
        help="Then upload it as Hub dataset REPO (needs a token).",
    ),
    private: bool = typer.Option(
        False, "--private", help="With --push-to-hub: a private dataset repo."
    ),
) -> None:
    """Write a build's packed rows with their columns as Parquet or a Hugging Face dataset, for
    trainers that read those (see docs/ECOSYSTEM.md)."""
    from longdata.tools.export import export_build

    result = export_build(
        build_dir,
        out,
        format=format,
        split=split,
        with_labels=with_labels,
        push_to_hub=push_to_hub,
        private=private,
    )
    rows = ", ".join(f"{name} {count:,} rows" for name, count in result.rows.items())
    console.print(
        f"[green]exported[/green] {rows} to {result.out_dir} ({result.format})", highlight=False
    )
    if result.pushed_to:
        console.print(f"pushed to {result.pushed_to}", highlight=False)


# The trainer is its own package (it reads only the row schema and manifest) and the evals sit
# above both; their commands are mounted here so users have one entry point.
from longdata.evals import cli as evals_cli  # noqa: E402
from longdata.trainer import cli as trainer_cli  # noqa: E402

app.command("train")(trainer_cli.train)
app.command("check-packing")(trainer_cli.check_packing)
app.command("plan-memory")(trainer_cli.plan_memory)

eval_app = _typer(
    "Evaluate a trained model: `longdata eval niah` (needle-in-a-haystack retrieval over a "
    "grid of context lengths x needle depths, with a heatmap), `longdata eval ruler` "
    "(RULER-style multi-key, multi-value, variable tracking, word extraction and QA tasks per "
    "length, with controls) and `longdata eval loss` "
    "(validation loss of a build per source and length bucket). See docs/EVAL.md."
)
eval_app.command("niah")(evals_cli.eval_niah)
eval_app.command("ruler")(evals_cli.eval_ruler)
eval_app.command("loss")(evals_cli.eval_loss)
app.add_typer(eval_app, name="eval")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
