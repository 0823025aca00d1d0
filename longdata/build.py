"""Building a recipe: set up the output, run the pipeline's stages, publish.

The stages and their order are ``longdata.pipeline``'s; an executor (``longdata.executors``)
runs their tasks, in this process by default or on Ray. The output is assembled in a hidden
``.<name>.partial`` directory beside the target and moved into place only once complete, with
``manifest.json`` written last, so an interrupted build never leaves output that looks finished.
What a build may write, replace and lock is decided in ``longdata.output``.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from longdata import __version__
from longdata.executors import Executor, LocalExecutor
from longdata.format import (
    FORMAT,
    Manifest,
    RecipeEntry,
    SourceEntry,
    SplitEntry,
    TokenizerEntry,
    write_manifest,
)
from longdata.format.manifest import BuildTotals
from longdata.output import claim_output, discard_partial, output_lock, publish, start_partial
from longdata.pipeline import BuildError, TokenizedSource, run_stages
from longdata.recipe import FileSource, Recipe, load_recipe
from longdata.stages.accounting import row_accounting
from longdata.stages.mix import Mix
from longdata.tools.card import card_destination, check_card_destination, copy_card, write_card

__all__ = ["BuildError", "BuildResult", "build"]


class RemoteOutputError(OSError):
    """The output URL cannot be written: no such bucket, no permission, unreachable."""

    exit_code = 2


@dataclass
class BuildResult:
    out_dir: Path
    manifest: Manifest
    seconds: dict[str, float] = field(default_factory=dict)
    remote: str | None = None  # where the build was uploaded, when the output is a URL


def build(
    recipe: Recipe | str | Path,
    *,
    out: str | Path | None = None,
    overrides: Sequence[str] = (),
    strict: bool = False,
    overwrite: bool = False,
    allow_empty: bool = False,
    copy_card_to_card_dir: bool = True,
    console: Console | None = None,
    executor: Executor | None = None,
) -> BuildResult:
    """Run every stage of ``recipe`` (with ``executor``, default in this process) and publish the
    build directory atomically. ``out`` may be a URL (``s3://bucket/path``, ...).

    ``overwrite`` allows replacing an existing output directory that is not a longdata build
    (see ``longdata.output.claim_output`` for what is never replaced). A build without a single
    training row fails (BuildError) unless ``allow_empty``. With ``copy_card_to_card_dir`` the
    card is also copied to ``<card_dir>/<name>`` (the CLI turns it off for a build with ``--out``
    or ``--set``, whose card would replace the default build's tracked one)."""
    console = console or Console(stderr=True)
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, list(overrides))
    target = str(out or recipe.output.dir)
    remote = target if "://" in target else None
    # A remote build is assembled and published locally first, then uploaded manifest-last.
    out_dir = Path(recipe.cache_dir) / "staging" / recipe.name if remote else Path(target)
    if remote:
        check_remote_output(remote)  # a missing bucket fails now, not after the whole build
    claim_output(out_dir, overwrite=overwrite, keep=needed_paths(recipe))
    # An unsafe name or a card directory that is not longdata's fails before any work.
    card_copy = card_destination(recipe.output.card_dir, recipe.name)
    if copy_card_to_card_dir:
        check_card_destination(out_dir, card_copy)
    with output_lock(out_dir):
        try:
            return _run_build(
                recipe,
                out_dir,
                remote,
                strict,
                allow_empty,
                console,
                executor or LocalExecutor(),
                card_copy if copy_card_to_card_dir else None,
            )
        except BaseException:
            discard_partial(out_dir)
            raise


def needed_paths(recipe: Recipe) -> list[Path]:
    """What an output directory must never swallow: the cache, the card directory, local sources."""
    local_sources = [
        Path(s.path) for s in recipe.sources if isinstance(s, FileSource) and Path(s.path).exists()
    ]
    return [Path(recipe.cache_dir), Path(recipe.output.card_dir), *local_sources]


def _run_build(
    recipe: Recipe,
    out_dir: Path,
    remote: str | None,
    strict: bool,
    allow_empty: bool,
    console: Console,
    executor: Executor,
    card_copy: Path | None,
) -> BuildResult:
    partial = start_partial(out_dir)
    seconds: dict[str, float] = {}
    started_at = time.time()
    stages = run_stages(recipe, executor, partial, console, strict=strict, seconds=seconds)
    return finish_build(
        recipe,
        stages.tokenizer_info,
        stages.sources,
        stages.mixed,
        stages.splits,
        partial,
        out_dir,
        remote,
        seconds,
        started_at,
        allow_empty=allow_empty,
        card_copy=card_copy,
    )


def finish_build(
    recipe: Recipe,
    tokenizer_info: TokenizerEntry,
    sources: list[TokenizedSource],
    mixed: Mix,
    splits: list[SplitEntry],
    partial: Path,
    out_dir: Path,
    remote: str | None,
    seconds: dict[str, float],
    started_at: float,
    allow_empty: bool = False,
    card_copy: Path | None = None,
) -> BuildResult:
    """Manifest, card and build info into ``partial``, then publish it, copy its card to
    ``card_copy`` (when given) and upload it."""
    if not allow_empty and not sum(s.rows for s in splits if s.is_train):
        raise BuildError(_empty_build_reason(recipe, sources, mixed, splits))
    _publish_quarantine(sources, partial)
    manifest = make_manifest(partial, recipe, tokenizer_info, sources, mixed, splits)
    clock = time.perf_counter()
    write_card(partial, manifest)
    seconds["card"] = time.perf_counter() - clock
    (partial / "build_info.json").write_text(
        json.dumps(
            {
                "started_at": started_at,
                "finished_at": time.time(),
                "seconds": seconds,
                "cache_dir": str(Path(recipe.cache_dir).resolve()),
                "cached_sources": [s.name for s in sources if s.cached],
            },
            indent=1,
        )
    )
    write_manifest(manifest)
    publish(partial, out_dir)
    if card_copy is not None:
        copy_card(out_dir, card_copy)
    if remote:
        clock = time.perf_counter()
        upload_build(out_dir, remote)
        seconds["upload"] = time.perf_counter() - clock
    return BuildResult(out_dir, dataclasses.replace(manifest, build_dir=out_dir), seconds, remote)


def _empty_build_reason(
    recipe: Recipe, sources: list[TokenizedSource], mixed: Mix, splits: list[SplitEntry]
) -> str:
    read = sum(s.cache.stats.rows_read for s in sources)
    quarantined = sum(s.cache.stats.quarantined for s in sources)
    filtered = sum(m.too_short + m.too_long for m in mixed.stats)
    left_out = sum(s.overlength.left_out for s in splits if s.is_train)
    return (
        f"the build has no training rows: {read} rows read, {quarantined} quarantined (see "
        f"{recipe.cache_dir}/tokenized/*/quarantine.jsonl), {filtered} length-filtered, "
        f"{len(mixed.train)} training samples, {left_out} left out by packing at max_seq_len "
        f"{recipe.shortest_seq_len}; pass --allow-empty to publish it anyway"
    )


def _publish_quarantine(sources: list[TokenizedSource], out_dir: Path) -> int:
    total = 0
    for source in sources:
        count = source.cache.stats.quarantined
        if count:
            target = out_dir / "quarantine" / f"{source.name}.jsonl"
            target.parent.mkdir(exist_ok=True)
            with target.open("wb") as merged:
                for part in source.cache.quarantine_files:
                    merged.write(part.read_bytes())
        total += count
    return total


# --- manifest and publishing -----------------------------------------------------------------


def make_manifest(
    build_dir: Path,
    recipe: Recipe,
    tokenizer_info: TokenizerEntry,
    sources: list[TokenizedSource],
    mixed: Mix,
    splits: list[SplitEntry],
) -> Manifest:
    source_entries = []
    for source, mix_stats in zip(sources, mixed.stats):
        counts = source.cache.stats.counts()
        source_entries.append(
            SourceEntry(
                name=source.name,
                kind=source.kind,
                weight=source.weight,
                tokenize=counts,
                mix=mix_stats,
                rows=row_accounting(counts, mix_stats),
            )
        )
    train = [s for s in splits if s.is_train]
    return Manifest(
        build_dir=build_dir,
        format=FORMAT,
        name=recipe.name,
        tokenizer=tokenizer_info,
        sources=tuple(source_entries),
        splits={s.name: s for s in splits},  # in stage order, as the pipeline lists them
        # cache_dir is where this machine keeps intermediate files, not part of the data.
        recipe=RecipeEntry.from_document(recipe.model_dump(mode="json", exclude={"cache_dir"})),
        language_balance=mixed.language,
        totals=BuildTotals(
            quarantined=sum(s.cache.stats.quarantined for s in sources),
            samples=sum(s.cache.stats.samples for s in sources),
            tokens=sum(s.cache.stats.tokens for s in sources),
            train_rows=sum(s.rows for s in train),
            train_tokens=sum(s.totals.tokens for s in train),
        ),
        versions=_versions(),
    )


def _versions() -> dict[str, str]:
    import numpy
    import tokenizers
    import transformers

    return {
        "longdata": __version__,
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "tokenizers": tokenizers.__version__,
        "transformers": transformers.__version__,
    }


# Written and removed again by `check_remote_output`; the build's own files never have this name.
WRITE_CHECK_FILE = ".longdata-write-check"


def _remote_fs(remote: str):
    import fsspec

    # A fresh filesystem, not fsspec's cached one, so the endpoint and credentials are the
    # environment's now, not those of an earlier upload in this process.
    fs, root = fsspec.core.url_to_fs(remote, skip_instance_cache=True)
    return fs, root.rstrip("/")


def check_remote_output(remote: str) -> None:
    """Write and remove one empty file under ``remote``: a bucket that is missing, forbidden or
    unreachable fails here in one line (RemoteOutputError) before any work is done."""
    try:
        fs, root = _remote_fs(remote)
        fs.pipe_file(f"{root}/{WRITE_CHECK_FILE}", b"")
        fs.rm_file(f"{root}/{WRITE_CHECK_FILE}")
    except Exception as error:  # each store and client raises its own types
        raise RemoteOutputError(
            f"cannot write to {remote}: {_reason(error)}; nothing was built"
        ) from None


def upload_build(local: Path, remote: str) -> None:
    """Upload through fsspec (s3:// with s3fs, gs:// with gcsfs, ...). The manifest goes last, so
    a reader never finds a manifest whose shards are not all there yet."""
    fs, root = _remote_fs(remote)
    files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    files.remove("manifest.json")
    try:
        for name in [*files, "manifest.json"]:
            fs.put_file(str(local / name), f"{root}/{name}")
    except Exception as error:  # each store and client raises its own types
        raise RemoteOutputError(
            f"uploading the build {local} to {remote} failed: {_reason(error)}; the local build "
            "is complete, and no manifest was uploaded unless every shard was"
        ) from None


def _reason(error: Exception) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
