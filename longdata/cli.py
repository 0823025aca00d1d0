"""The ``longdata`` command line: parse, call one function per command, print."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text


def _typer(help: str) -> typer.Typer:
    return typer.Typer(help=help, no_args_is_help=True, add_completion=False,
                       pretty_exceptions_enable=False, rich_markup_mode="markdown")


app = _typer(
    "Build packed long-context fine-tuning datasets and train on them.\n\n"
    "Typical use: `longdata validate recipe.yml`, `longdata build recipe.yml`, look at the data "
    "with `longdata inspect build/<name>` and its card (`build/<name>/README.md`), then "
    "`longdata train build/<name>` and `longdata eval niah --model runs/<run>/final`.")
console = Console(stderr=True)

RecipeArg = typer.Argument(..., exists=False, help="Path to a recipe YAML file (see recipes/).")
SetOption = typer.Option(
    None, "--set", metavar="KEY.PATH=VALUE",
    help="Override a recipe field, e.g. --set packing.max_seq_len=16384 --set sources[1].weight=2. "
         "Values are parsed as YAML. Repeatable.")


def _load(recipe: Path, overrides: list[str] | None):
    from longdata.recipe import RecipeError, load_recipe

    try:
        return load_recipe(recipe, overrides or [])
    except RecipeError as exc:
        for problem in exc.problems:
            console.print(f"[red]error[/red] {escape(problem)}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


@app.command()
def validate(recipe: Path = RecipeArg, overrides: list[str] | None = SetOption) -> None:
    """Check a recipe without doing any work: every wrong key is reported with its path, exit code 2."""
    loaded = _load(recipe, overrides)
    console.print(f"[green]ok[/green] {recipe}: recipe '{loaded.name}' with {len(loaded.sources)} sources, "
                  f"rows up to {loaded.longest_seq_len:,} tokens, output {loaded.output.dir}")


@app.command()
def build(
    recipe: Path = RecipeArg,
    out: Path | None = typer.Option(None, "--out", help="Output directory (default: the recipe's output.dir)."),
    overrides: list[str] | None = SetOption,
    strict: bool = typer.Option(False, "--strict", help="Fail if any source row had to be quarantined."),
    workers: int = typer.Option(1, "--workers", min=1,
                                help="Split the build across N workers sharing cache_dir and the output "
                                     "directory (a shared filesystem); then run `longdata merge`."),
    worker_index: int = typer.Option(0, "--worker-index", min=0, help="This worker's index in [0, N)."),
) -> None:
    """Build MDS shards, a manifest and a data card from a recipe.

    Stages: read -> normalise -> tokenize (cached per source) -> mix -> pack -> write -> card.
    The build appears at its output directory only once complete; malformed input rows are
    written to <out>/quarantine/<source>.jsonl with their location and reason.
    """
    from longdata.build import BuildError
    from longdata.build import build as run_build
    from longdata.templates import TemplateError

    loaded = _load(recipe, overrides)
    try:
        if workers > 1:
            from longdata.partition import build_worker

            report = build_worker(loaded, workers=workers, worker_index=worker_index, out=out, console=console)
            console.print(f"[green]worker {worker_index} of {workers} done[/green] ({report}); when all "
                          f"are, run: longdata merge {out or loaded.output.dir}")
            return
        result = run_build(loaded, out=out, strict=strict, console=console)
    except (BuildError, TemplateError, FileNotFoundError) as exc:
        console.print(f"[red]error[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    _print_summary(result)


@app.command()
def merge(out: Path = typer.Argument(..., help="The output directory the workers built into.")) -> None:
    """Join a partitioned build (`longdata build --workers N --worker-index I`, run for every I)
    into one dataset: each bucket stream's parts are merged with streaming's merge_index, and the
    manifest and card are written as a single-process build writes them."""
    from longdata.build import BuildError
    from longdata.partition import merge as run_merge

    try:
        result = run_merge(out, console=console)
    except BuildError as exc:
        console.print(f"[red]error[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    _print_summary(result)


def _print_summary(result) -> None:
    manifest = result.manifest
    table = Table(title=f"{manifest['name']} -> {result.out_dir}", title_justify="left")
    for column in ("split", "stream", "rows", "tokens", "target tokens", "fill", "rows/bound"):
        table.add_column(column, justify="left" if column in ("split", "stream") else "right")
    for name, split in manifest["splits"].items():
        for stream in split["streams"]:
            table.add_row(name, stream["name"], f"{stream['rows']:,}", f"{stream['tokens']:,}",
                          f"{stream['target_tokens']:,}", f"{split['packing']['fill']:.2%}",
                          f"{split['packing']['rows_over_bound']:.3f}")
    console.print(table)
    sources = Table(title="sources", title_justify="left")
    for column in ("source", "read", "quarantined", "samples", "duplicates", "tokens", "train tokens"):
        sources.add_column(column, justify="left" if column == "source" else "right")
    for s in manifest["sources"]:
        sources.add_row(s["name"], f"{s['tokenize']['rows_read']:,}", f"{s['tokenize']['quarantined']:,}",
                        f"{s['tokenize']['samples']:,}", f"{s['mix']['duplicates']:,}",
                        f"{s['tokenize']['tokens']:,}", f"{s['mix']['train_tokens']:,}")
    console.print(sources)
    console.print("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items()))


@app.command()
def verify(build_dir: Path = typer.Argument(..., help="A build directory (holds manifest.json).")) -> None:
    """Re-read every shard of a build: hashes and sizes against each index.json, every row against
    the row contract (docs/ROW_SCHEMA.md), and all totals against manifest.json. Exit code 1 on any
    problem, each reported with its shard and row."""
    from longdata.verify import verify_build

    report = verify_build(build_dir)
    for problem in report.problems:
        console.print(f"[red]corrupt[/red] {escape(problem)}", highlight=False, soft_wrap=True)
    if not report.ok:
        raise typer.Exit(1)
    console.print(f"[green]ok[/green] {build_dir}: {report.shards} shards, {report.rows:,} rows, "
                  f"{report.tokens:,} tokens verified")


@app.command()
def card(
    build_dir: Path = typer.Argument(..., help="A finished build directory (holds manifest.json)."),
    copy_to: Path | None = typer.Option(
        None, help="Also write the card here with its plots beside it, e.g. data_cards/<name>. "
                   "Default: <card_dir>/<name> from the build's recipe, as the build does."),
    copy: bool = typer.Option(True, help="--no-copy: regenerate only the card inside the build."),
) -> None:
    """Regenerate a build's data card (README.md with YAML front matter, plots in card/) from its
    manifest and sample indexes: sources, mix, languages, lengths, packing, loss-weight skew."""
    import json

    from longdata.card import copy_card, write_card

    manifest_path = build_dir / "manifest.json"
    if not manifest_path.exists():
        console.print(f"[red]error[/red] {escape(str(manifest_path))} is missing: not a finished longdata build",
                      highlight=False, soft_wrap=True)
        raise typer.Exit(2)
    manifest = json.loads(manifest_path.read_text())
    written = [write_card(build_dir, manifest)]
    if copy:
        destination = copy_to or Path(manifest["recipe"]["output"]["card_dir"]) / manifest["name"]
        written.append(copy_card(build_dir, destination))
    for path in written:
        console.print(f"wrote {path}", highlight=False, soft_wrap=True)


@app.command()
def inspect(
    build_dir: Path = typer.Argument(..., help="A build directory (holds manifest.json)."),
    split: str | None = typer.Option(
        None, "--split", help="Default: the first train split (of the first curriculum stage)."),
    stream: str | None = typer.Option(
        None, "--stream", help="A bucket stream of the split, e.g. le_016384. Default: its first "
                               "stream with rows (with --sample-id: any stream)."),
    row: int | None = typer.Option(None, "--row", help="Row number inside the stream (default 0)."),
    sample_id: str | None = typer.Option(
        None, "--sample-id", metavar="SOURCE:POSITION",
        help="Show the row holding this sample (looked up in `<split>/samples.parquet`; with no "
             "--split, in the first split that packs it, stages in order, train first); says "
             "why when it was not packed."),
    context: int = typer.Option(
        100, "--context", metavar="N",
        help="Tokens kept at each end of a long non-target run before eliding its middle "
             "(0: only the targets). Target runs are elided only when huge: they keep 10x as "
             "many, at least 1,000, at each end."),
    full: bool = typer.Option(False, "--full", help="Show every token: no elision."),
    as_json: bool = typer.Option(False, "--json", help="Print the row as JSON (segments per sample)."),
    plain: bool = typer.Option(
        False, "--plain", help="No colour: targets wrapped in ⟦…⟧ (also the default when colour "
                               "is off: a pipe, NO_COLOR)."),
) -> None:
    """Show one packed row: each sample's boundaries, id, source, length and status, and its text
    with target (loss) tokens highlighted and the rest dimmed; long runs are elided in the middle
    with a count. The fastest way to see a chat-template or loss-mask bug.

    Exit code 2 for a bad build, split, stream, row or sample id; 1 when the sample was not packed
    (the reason is printed) or a shard is corrupt."""
    import json as json_module

    from longdata.inspect import InspectError, NotPacked, inspect_row, render, render_not_packed
    from longdata.mds import ShardError

    out = Console(color_system=None, highlight=False) if plain else Console(highlight=False)
    try:
        view = inspect_row(build_dir, split=split, stream=stream, row=row, sample_id=sample_id,
                           context=context, full=full)
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
    out: Path = typer.Option(..., "--out", help="Output directory: missing, empty, or an earlier export."),
    format: str = typer.Option("parquet", "--format", help="parquet (OUT/SPLIT.parquet) or hf "
                               "(a datasets.load_from_disk dataset, one split per build split)."),
    split: str | None = typer.Option(None, "--split", help="Export only this split (default: all)."),
    with_labels: bool = typer.Option(False, "--with-labels", help="Add labels (-100 outside targets and "
                                     "at every sample's first token) and position_ids (restarting at "
                                     "every sample)."),
    push_to_hub: str | None = typer.Option(None, "--push-to-hub", metavar="REPO",
                                           help="Then upload it as Hub dataset REPO (needs a token)."),
    private: bool = typer.Option(False, "--private", help="With --push-to-hub: a private dataset repo."),
) -> None:
    """Write a build's packed rows with their columns as Parquet or a Hugging Face dataset, for
    trainers that read those (see docs/ECOSYSTEM.md)."""
    from longdata.export import ExportError, UploadError, export_build

    try:
        result = export_build(build_dir, out, format=format, split=split, with_labels=with_labels,
                              push_to_hub=push_to_hub, private=private)
    except (ExportError, UploadError) as exc:
        console.print(f"[red]error[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2 if isinstance(exc, ExportError) else 1) from None
    rows = ", ".join(f"{name} {count:,} rows" for name, count in result.rows.items())
    console.print(f"[green]exported[/green] {rows} to {result.out_dir} ({result.format})", highlight=False)
    if result.pushed_to:
        console.print(f"pushed to {result.pushed_to}", highlight=False)


# The trainer is its own package (it reads only the row schema and manifest) and the evals sit
# above both; their commands are mounted here so users have one entry point.
from evals import cli as evals_cli  # noqa: E402
from trainer import cli as trainer_cli  # noqa: E402

app.command("train")(trainer_cli.train)
app.command("check-packing")(trainer_cli.check_packing)

eval_app = _typer(
    "Evaluate a trained model: `longdata eval niah` (needle-in-a-haystack retrieval over a "
    "grid of context lengths x needle depths, with a heatmap) and `longdata eval loss` "
    "(validation loss of a build per source and length bucket). See docs/EVAL.md.")
eval_app.command("niah")(evals_cli.eval_niah)
eval_app.command("loss")(evals_cli.eval_loss)
app.add_typer(eval_app, name="eval")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
