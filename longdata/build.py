"""The build pipeline: read -> normalise -> tokenize -> mix -> pack -> write -> card.

Each stage is a function of typed inputs with its own stats. The output is assembled in a hidden
``.<name>.partial`` directory beside the target and moved into place only once complete, with
``manifest.json`` written last, so an interrupted build never leaves output that looks finished.
What a build may write, replace and lock is decided in ``longdata.output``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from longdata import __version__, packing
from longdata.accounting import row_accounting
from longdata.card import card_destination, copy_card, write_card
from longdata.format import FORMAT, Manifest, inside, write_manifest
from longdata.mix import Mix, SampleList, SourceSamples, mix
from longdata.near_dedup import NearDuplicateFilter
from longdata.output import claim_output, discard_partial, output_lock, publish, start_partial
from longdata.recipe import (
    AntiHaystackSource,
    FileSource,
    Recipe,
    check_against_tokenizer,
    load_recipe,
)
from longdata.sample_index import gather_column, write_sample_index
from longdata.shards import RowAssembler, StreamStats, piece_mask, write_stream
from longdata.sources import haystack_paths, read_source, resolve_path
from longdata.templates import TokenizerInfo, load_tokenizer
from longdata.tokenize import PartitionedCache, TokenCache, entry_problem, tokenize_records

# Bump when normalisation or tokenization changes what a cached source would contain.
CACHE_VERSION = 4


class BuildError(RuntimeError):
    """A build that must stop (e.g. ``--strict`` with quarantined rows); nothing is published."""

    exit_code = 1


@dataclass
class TokenizedSource:
    name: str
    kind: str
    weight: float
    cache: TokenCache | PartitionedCache
    cached: bool


@dataclass
class SplitResult:
    name: str
    max_seq_len: int
    stage: str | None
    samples: int
    overlength: dict[str, int]
    packing: dict[str, Any]
    streams: list[StreamStats]

    def as_dict(self) -> dict[str, Any]:
        tokens = sum(s.tokens for s in self.streams)
        return {
            "max_seq_len": self.max_seq_len, "stage": self.stage, "samples": self.samples,
            "rows": sum(s.rows for s in self.streams), "tokens": tokens,
            "target_tokens": sum(s.target_tokens for s in self.streams),
            "overlength": self.overlength, "packing": self.packing,
            "streams": [s.as_dict() for s in self.streams],
        }


@dataclass
class BuildResult:
    out_dir: Path
    manifest: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)
    remote: str | None = None  # where the build was uploaded, when the output is a URL


def build(recipe: Recipe | str | Path, *, out: str | Path | None = None, overrides: Sequence[str] = (),
          strict: bool = False, overwrite: bool = False, allow_empty: bool = False,
          console: Console | None = None) -> BuildResult:
    """Run every stage of ``recipe`` and publish the build directory atomically.

    ``overwrite`` allows replacing an existing output directory that is not a longdata build
    (see ``longdata.output.claim_output`` for what is never replaced). A build without a single
    training row fails (BuildError) unless ``allow_empty``."""
    console = console or Console(stderr=True)
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, list(overrides))
    target = str(out or recipe.output.dir)
    remote = target if "://" in target else None
    # A remote build is assembled and published locally first, then uploaded manifest-last.
    out_dir = Path(recipe.cache_dir) / "staging" / recipe.name if remote else Path(target)
    claim_output(out_dir, overwrite=overwrite, keep=needed_paths(recipe))
    card_destination(recipe.output.card_dir, recipe.name)  # an unsafe name fails before any work
    with output_lock(out_dir):
        try:
            return _run_build(recipe, out_dir, remote, strict, allow_empty, console)
        except BaseException:
            discard_partial(out_dir)
            raise


def needed_paths(recipe: Recipe) -> list[Path]:
    """What an output directory must never swallow: the cache, the card directory, local sources."""
    local_sources = [Path(s.path) for s in recipe.sources
                     if isinstance(s, FileSource) and Path(s.path).exists()]
    return [Path(recipe.cache_dir), Path(recipe.output.card_dir), *local_sources]


def _run_build(recipe: Recipe, out_dir: Path, remote: str | None, strict: bool, allow_empty: bool,
               console: Console) -> BuildResult:
    partial = start_partial(out_dir)
    seconds: dict[str, float] = {}
    started_at = time.time()

    clock = time.perf_counter()
    tokenizer, tokenizer_info = load_tokenizer(recipe.tokenizer, recipe.has_chat_sources)
    check_against_tokenizer(recipe, tokenizer)
    seconds["load_tokenizer"] = time.perf_counter() - clock

    with _progress(console) as progress:
        clock = time.perf_counter()
        sources = [tokenize_source(s, recipe, tokenizer, tokenizer_info, progress) for s in recipe.sources]
        seconds["read_tokenize"] = time.perf_counter() - clock
        quarantined = sum(s.cache.stats.quarantined for s in sources)
        if strict and quarantined:
            shutil.rmtree(partial, ignore_errors=True)
            raise BuildError(f"--strict: {quarantined} source rows were quarantined; see the "
                             f"quarantine files under {recipe.cache_dir}/tokenized/")

        clock = time.perf_counter()
        mixed = mix_sources(sources, recipe, console)
        seconds["mix"] = time.perf_counter() - clock

        clock = time.perf_counter()
        caches = [s.cache for s in sources]
        splits = []
        for layout in split_layout(recipe, mixed):
            split = plan_split(*layout, caches, recipe)
            splits.append(split.result(write_split(split, caches, recipe, partial, progress)))
            write_sample_index(split, caches, [s.name for s in sources], partial)
        seconds["pack_write"] = time.perf_counter() - clock

    return finish_build(recipe, tokenizer_info, sources, mixed, splits, partial, out_dir, remote,
                        seconds, started_at, allow_empty=allow_empty)


def finish_build(recipe: Recipe, tokenizer_info: TokenizerInfo, sources: list[TokenizedSource], mixed: Mix,
                 splits: list[SplitResult], partial: Path, out_dir: Path, remote: str | None,
                 seconds: dict[str, float], started_at: float, allow_empty: bool = False) -> BuildResult:
    """Manifest, card and build info into ``partial``, then publish (and upload) it."""
    if not allow_empty and not sum(s.as_dict()["rows"] for s in splits if s.name.endswith("train")):
        shutil.rmtree(partial, ignore_errors=True)
        raise BuildError(_empty_build_reason(recipe, sources, mixed, splits))
    _publish_quarantine(sources, partial)
    manifest = make_manifest(recipe, tokenizer_info, sources, mixed, splits)
    clock = time.perf_counter()
    write_card(partial, Manifest.parse(partial, manifest))
    seconds["card"] = time.perf_counter() - clock
    (partial / "build_info.json").write_text(json.dumps({
        "started_at": started_at, "finished_at": time.time(), "seconds": seconds,
        "cache_dir": str(Path(recipe.cache_dir).resolve()),
        "cached_sources": [s.name for s in sources if s.cached]}, indent=1))
    write_manifest(partial, manifest)
    publish(partial, out_dir)
    copy_card(out_dir, card_destination(recipe.output.card_dir, recipe.name))
    if remote:
        clock = time.perf_counter()
        upload_build(out_dir, remote)
        seconds["upload"] = time.perf_counter() - clock
    return BuildResult(out_dir, manifest, seconds, remote)


def _empty_build_reason(recipe: Recipe, sources: list[TokenizedSource], mixed: Mix,
                        splits: list[SplitResult]) -> str:
    read = sum(s.cache.stats.rows_read for s in sources)
    quarantined = sum(s.cache.stats.quarantined for s in sources)
    filtered = sum(m.too_short + m.too_long for m in mixed.stats)
    left_out = sum(s.overlength["dropped"] + s.overlength["empty"] + s.overlength["no_target_after_cut"]
                   for s in splits if s.name.endswith("train"))
    return (f"the build has no training rows: {read} rows read, {quarantined} quarantined (see "
            f"{recipe.cache_dir}/tokenized/*/quarantine.jsonl), {filtered} length-filtered, "
            f"{len(mixed.train)} training samples, {left_out} left out by packing at max_seq_len "
            f"{recipe.shortest_seq_len}; pass --allow-empty to publish it anyway")


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console, transient=False)


# --- stage: read + normalise + tokenize (cached per source) ---------------------------------


def cache_key(source, recipe: Recipe, tokenizer_info: TokenizerInfo, template: str) -> str:
    """Everything that changes a source's tokens; weights, filters and packing are not in it.
    ``template`` is the chat template with the recipe's chat_template_kwargs bound into it."""
    digest = hashlib.sha256()
    config = source.model_dump(mode="json", exclude={"weight", "min_tokens", "max_tokens", "name"})
    digest.update(json.dumps([CACHE_VERSION, config, tokenizer_info.sha256, template,
                              recipe.tokenizer.multi_turn, recipe.tokenizer.special_tokens_in_text],
                             sort_keys=True).encode())
    if isinstance(source, FileSource):
        digest.update(_content_fingerprint(resolve_path(source, Path(recipe.cache_dir))).encode())
    else:
        digest.update(__version__.encode())  # generated data changes with the generator
        for path, named in haystack_paths(source.haystack or (), Path(recipe.cache_dir), recipe.text_sources):
            digest.update(_content_fingerprint(path).encode())
            digest.update(json.dumps(named.model_dump(mode="json") if named else None).encode())
    return digest.hexdigest()[:16]


def _content_fingerprint(path: str) -> str:
    local = Path(path)
    if not local.exists():
        return f"hub:{path}"  # a hub dataset is named by its id (and revision, in the config)
    files = sorted(p for p in local.rglob("*") if p.is_file()) if local.is_dir() else [local]
    digest = hashlib.blake2b(digest_size=16)
    for file in files:
        digest.update(str(file.relative_to(local) if local.is_dir() else file.name).encode())
        with file.open("rb") as handle:
            while chunk := handle.read(8 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def cache_entry(source, recipe: Recipe, tokenizer_info: TokenizerInfo, template: str,
                share: tuple[int, int] = (0, 1)) -> Path:
    """Where a source's tokenized cache lives; one entry per share in a partitioned build."""
    key = cache_key(source, recipe, tokenizer_info, template)
    suffix = f"-part{share[0]}of{share[1]}" if share[1] > 1 else ""
    return Path(recipe.cache_dir) / "tokenized" / f"{source.name}-{key}{suffix}"


def tokenize_source(source, recipe: Recipe, tokenizer, tokenizer_info: TokenizerInfo,
                    progress: Progress, share: tuple[int, int] = (0, 1)) -> TokenizedSource:
    entry = cache_entry(source, recipe, tokenizer_info, tokenizer.chat_template, share)
    cached = entry.exists()
    if cached and (problem := entry_problem(entry)):
        progress.console.print(f"[yellow]note[/yellow] cached tokens of source {source.name} "
                               f"({entry.name}): {problem}; tokenizing the source again", highlight=False,
                               soft_wrap=True)
        shutil.rmtree(entry)
        cached = False
    if not cached:
        total = source.count if isinstance(source, AntiHaystackSource) else source.max_samples
        task = progress.add_task(f"tokenize {source.name}", total=total, rate="")
        started, seen_tokens = time.perf_counter(), 0

        def advance(records: int, tokens: int) -> None:
            nonlocal seen_tokens
            seen_tokens += tokens
            rate = seen_tokens / max(time.perf_counter() - started, 1e-9)
            progress.update(task, advance=records, rate=f"{rate / 1e3:,.0f}K tok/s")

        backend = tokenizer.backend_tokenizer
        records = read_source(source, cache_dir=Path(recipe.cache_dir), share=share,
                              count_tokens=lambda text: len(backend.encode(text, add_special_tokens=False)),
                              text_sources=recipe.text_sources)
        staging = entry.with_name(entry.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        tokenize_records(records, tokenizer, staging, multi_turn=recipe.tokenizer.multi_turn,
                         max_samples=source.max_samples, on_progress=advance,
                         special_tokens_in_text=recipe.tokenizer.special_tokens_in_text)
        staging.rename(entry)
        progress.update(task, total=progress.tasks[task].completed)
    return TokenizedSource(source.name, source.kind, source.weight, TokenCache(entry), cached)


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


# --- stage: mix ------------------------------------------------------------------------------


def mix_sources(sources: list[TokenizedSource], recipe: Recipe, console: Console | None = None) -> Mix:
    """The mix of the tokenized sources; language_share warnings go to ``console``."""
    inputs = [SourceSamples(name=s.name, weight=s.weight, lengths=s.cache.lengths,
                            text_hash=s.cache.text_hash, lang=s.cache.lang, min_tokens=config.min_tokens,
                            max_tokens=config.max_tokens, tokens=_sample_tokens(s.cache),
                            row=s.cache.position)
              for s, config in zip(sources, recipe.sources)]
    near = recipe.dedup.near
    mixed = mix(inputs, seed=recipe.seed, validation_fraction=recipe.validation.fraction,
                validation_max=recipe.validation.max_samples, dedup=recipe.dedup.exact,
                shuffle=recipe.packing.algorithm != "next_fit", language_share=recipe.language_share,
                language_share_mode=recipe.language_share_mode,
                near_duplicates=NearDuplicateFilter(near.threshold, near.num_perm, near.ngram) if near else None)
    if console is not None and mixed.language is not None:
        for line in mixed.language.warnings(recipe.language_share_warn):
            console.print(f"[yellow]warning[/yellow] {line}", highlight=False)
    return mixed


def _sample_tokens(cache):
    def tokens(sample: int) -> np.ndarray:
        return cache.tokens(sample, 0, int(cache.lengths[sample]))[0]
    return tokens


# --- stage: pack + write ---------------------------------------------------------------------


def split_layout(recipe: Recipe, mixed: Mix):
    """(split name, samples, max_seq_len, over-length policy, stage name, bucket edges): the
    arguments of ``plan_split`` for every split to write."""
    stages = recipe.packing.stages or (None,)
    for stage in stages:
        max_len = stage.max_seq_len if stage else recipe.packing.max_seq_len
        overlength = (stage.overlength if stage else None) or recipe.packing.overlength
        requested = (stage.buckets if stage and stage.buckets else recipe.packing.buckets) or ()
        edges = sorted({e for e in requested if e < max_len} | {max_len})
        prefix = f"{stage.name}/" if stage else ""
        for split, samples in (("train", mixed.train), ("validation", mixed.validation)):
            if len(samples):
                yield f"{prefix}{split}", samples, max_len, overlength, stage.name if stage else None, edges


@dataclass
class SplitPlan:
    """One split packed on lengths alone: which pieces go in which row of which bucket."""

    name: str
    max_len: int
    stage: str | None
    samples: SampleList
    pieces: packing.Pieces
    plan: packing.Plan
    buckets: np.ndarray
    edges: list[int]
    counts: dict[str, Any]

    def bucket_rows(self) -> list[tuple[str, np.ndarray]]:
        """(stream name, row indices) for every bucket that holds rows."""
        named = zip(packing.bucket_names(self.edges), range(len(self.edges)))
        return [(name, rows) for name, b in named if len(rows := np.flatnonzero(self.buckets == b))]

    def result(self, streams: list[StreamStats]) -> SplitResult:
        total_tokens = sum(s.tokens for s in streams)
        for stream in streams:
            stream.proportion = stream.tokens / total_tokens if total_tokens else 0.0
        stats = packing.packing_stats(self.plan, self.pieces.length, self.max_len).as_dict()
        return SplitResult(self.name, self.max_len, self.stage, len(self.samples), self.counts, stats, streams)


def plan_split(name: str, samples: SampleList, max_len: int, overlength: str, stage: str | None,
               edges: list[int], caches: list, recipe: Recipe) -> SplitPlan:
    cuttable = (gather_column(caches, "user_start", samples.source, samples.index),
                gather_column(caches, "user_end", samples.source, samples.index)) \
        if overlength == "truncate_middle" else None
    pieces = packing.fit_to_length(samples.length, max_len, overlength, cuttable)
    pieces, no_target = _drop_targetless_cuts(pieces, samples, caches)
    plan = packing.plan(pieces.length, max_len, algorithm=recipe.packing.algorithm, seed=recipe.seed)
    buckets = packing.assign_buckets(plan.row_max_item_lengths(pieces.length), edges)
    counts = {"policy": overlength, "truncated": pieces.truncated, "dropped": pieces.dropped,
              "split": pieces.split, "middle_cut": pieces.middle_cut, "empty": pieces.empty,
              "no_target_after_cut": no_target}
    return SplitPlan(name, max_len, stage, samples, pieces, plan, buckets, edges, counts)


def write_split(split: SplitPlan, caches: list, recipe: Recipe, out_root: Path, progress: Progress,
                share: tuple[int, int] = (0, 1)) -> list[StreamStats]:
    """Write each bucket's rows as an MDS stream; with ``share=(i, n)`` only the i-th of n
    contiguous slices of every stream, into ``<stream>/part-<i>`` (joined later by merge)."""
    worker, workers = share
    assembler = RowAssembler(split.pieces, split.samples, caches)
    bucket_rows = [(name, rows[worker * len(rows) // workers:(worker + 1) * len(rows) // workers])
                   for name, rows in split.bucket_rows()]
    task = progress.add_task(f"write {split.name}", total=sum(len(r) for _, r in bucket_rows), rate="")
    streams = []
    for bucket_name, rows in bucket_rows:
        rel_path = f"{split.name}/{bucket_name}"
        destination = inside(out_root, rel_path) / (f"part-{worker:05d}" if workers > 1 else "")
        shutil.rmtree(destination, ignore_errors=True)  # a re-run worker replaces its own part

        def assembled(rows=rows):
            for row in rows.tolist():
                yield assembler.row(split.plan[row])
                progress.advance(task)

        streams.append(write_stream(assembled(), destination, name=bucket_name, rel_path=rel_path,
                                    compression=recipe.output.compression,
                                    size_limit=recipe.output.shard_size_limit))
    return streams


def _drop_targetless_cuts(pieces: packing.Pieces, samples: SampleList,
                          caches: list) -> tuple[packing.Pieces, int]:
    """A truncated or split-off piece may hold no assistant token at all; it would cost compute
    and teach nothing, so it is removed and counted."""
    cut = np.flatnonzero((pieces.start > 0) | (pieces.length < samples.length[pieces.sample]))
    empty = [i for i in cut.tolist() if not piece_mask(pieces, i, samples, caches).any()]
    if not empty:
        return pieces, 0
    keep = np.ones(len(pieces), dtype=bool)
    keep[empty] = False
    return pieces.select(keep), len(empty)


# --- manifest and publishing -----------------------------------------------------------------


def make_manifest(recipe: Recipe, tokenizer_info: TokenizerInfo, sources: list[TokenizedSource],
                  mixed: Mix, splits: list[SplitResult]) -> dict[str, Any]:
    source_entries = []
    for source, mix_stats in zip(sources, mixed.stats):
        tokenize_stats = dataclasses.asdict(source.cache.stats)
        tokenize_stats.pop("seconds")
        source_entries.append({"name": source.name, "kind": source.kind, "weight": source.weight,
                               "tokenize": tokenize_stats, "mix": mix_stats.as_dict(),
                               "rows": row_accounting(tokenize_stats, mix_stats.as_dict())})
    split_entries = {s.name: s.as_dict() for s in splits}
    train = [s for s in splits if s.name.endswith("train")]
    return {
        "format": FORMAT,
        "name": recipe.name,
        # cache_dir is where this machine keeps intermediate files, not part of the data.
        "recipe": recipe.model_dump(mode="json", exclude={"cache_dir"}),
        "tokenizer": tokenizer_info.as_dict(),
        "sources": source_entries,
        "language_balance": mixed.language.as_dict() if mixed.language else None,
        "splits": split_entries,
        "split_order": list(split_entries),  # stage order; the JSON's keys are sorted
        "totals": {
            "quarantined": sum(s.cache.stats.quarantined for s in sources),
            "samples": sum(s.cache.stats.samples for s in sources),
            "tokens": sum(s.cache.stats.tokens for s in sources),
            "train_rows": sum(split_entries[s.name]["rows"] for s in train),
            "train_tokens": sum(split_entries[s.name]["tokens"] for s in train),
        },
        "versions": _versions(),
    }


def _versions() -> dict[str, str]:
    import numpy
    import streaming
    import tokenizers
    import transformers

    return {"longdata": __version__, "python": platform.python_version(), "numpy": numpy.__version__,
            "mosaicml-streaming": streaming.__version__, "tokenizers": tokenizers.__version__,
            "transformers": transformers.__version__}


def upload_build(local: Path, remote: str) -> None:
    """Upload with streaming's own uploaders (s3://, gs://, oci://, azure://, ...). The manifest
    goes last, so a reader never finds a manifest whose shards are not all there yet."""
    from streaming.base.storage import CloudUploader

    uploader = CloudUploader.get((str(local), remote), keep_local=True, exist_ok=True)
    files = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    files.remove("manifest.json")
    for name in [*files, "manifest.json"]:
        uploader.upload_file(name)
