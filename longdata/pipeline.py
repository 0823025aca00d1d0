"""The build pipeline, written once: its stages and their order. Executors run its tasks.

    tokenize  per source partition: read -> normalise -> tokenize into a token-cache entry
              (tasks; an entry that exists is reused, so re-running a killed build skips it)
    mix       in the driver, on lengths, hashes and languages alone: filters, dedup, validation
              hold-out, weights (global and deterministic)
    plan      in the driver: over-length policy, packing plan and length buckets per split
    write     per contiguous slice of each bucket stream's rows: MDS shards (tasks)
    merge     in the driver: the slices of a stream joined by ``longdata.format.mds.merge_index``,
              and the split's sample index
    finish    manifest, card, publish: ``longdata.build.finish_build``

With the local executor (parallelism 1) nothing is cut: one cache entry per source, one writer
per stream, byte for byte today's single-process build. With more parallelism each source is cut
into partitions (``longdata.sources.partitions``) and each stream into that many slices; the
rows, their order, the manifest and the card are the same, only the shard files are cut
differently. Tasks only read their inputs and write their own output (a uniquely named staging
directory renamed into place, or a part directory they replace), so a retried task is harmless.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
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

from longdata import __version__
from longdata.executors import Executor
from longdata.format import SplitEntry, StreamEntry, TokenizerEntry, inside, split_name
from longdata.format.manifest import OverlengthCounts, SplitTotals
from longdata.format.mds import merge_index
from longdata.recipe import AntiHaystackSource, FileSource, Recipe, check_against_tokenizer
from longdata.sources import haystack_paths, read_source, resolve_path
from longdata.sources.partitions import Partition, count_rows, place, plan_partitions
from longdata.stages import packing
from longdata.stages.mix import Mix, SampleList, SourceSamples, mix
from longdata.stages.near_dedup import NearDuplicateFilter
from longdata.stages.sample_index import gather_column, write_sample_index
from longdata.stages.shards import RowAssembler, StreamStats, piece_mask, write_stream
from longdata.stages.templates import load_tokenizer
from longdata.stages.tokenization import (
    PartitionedCache,
    TokenCache,
    entry_problem,
    tokenize_records,
)
from longdata.tools.card import import_plotting

# Bump when normalisation or tokenization changes what a cached source would contain.
CACHE_VERSION = 6


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
    entries: list[str]  # the cache entries behind ``cache``, in partition order


@dataclass
class Stages:
    """What the stages produced, for ``finish_build``."""

    tokenizer_info: TokenizerEntry
    sources: list[TokenizedSource]
    mixed: Mix
    splits: list[SplitEntry]


def run_stages(
    recipe: Recipe,
    executor: Executor,
    partial: Path,
    console: Console,
    *,
    strict: bool,
    seconds: dict[str, float],
) -> Stages:
    """Every stage up to the manifest, writing the build's shards into ``partial``."""
    clock = time.perf_counter()
    tokenizer, tokenizer_info = _tokenizers[_tokenizer_key(recipe.tokenizer)] = load_tokenizer(
        recipe.tokenizer, recipe.has_chat_sources
    )
    check_against_tokenizer(recipe, tokenizer)
    seconds["load_tokenizer"] = time.perf_counter() - clock

    # The encoder holds no GIL: the card's imports run beside it rather than after the last stage.
    threading.Thread(target=import_plotting, name="import-plotting", daemon=True).start()
    with _progress(console) as progress:
        clock = time.perf_counter()
        sources = tokenize_sources(recipe, tokenizer, tokenizer_info, executor, progress)
        seconds["read_tokenize"] = time.perf_counter() - clock
        quarantined = sum(s.cache.stats.quarantined for s in sources)
        if strict and quarantined:  # build() discards the partial output it claimed
            raise BuildError(
                f"--strict: {quarantined} source rows were quarantined; see the "
                f"quarantine files under {recipe.cache_dir}/tokenized/"
            )

        clock = time.perf_counter()
        mixed = mix_sources(sources, recipe, console)
        seconds["mix"] = time.perf_counter() - clock

        clock = time.perf_counter()
        caches = [s.cache for s in sources]
        splits = []
        for layout in split_layout(recipe, mixed):
            split = plan_split(*layout, caches, recipe)
            splits.append(
                split.result(write_split(split, sources, recipe, partial, executor, progress))
            )
            write_sample_index(split, caches, [s.name for s in sources], partial)
        seconds["pack_write"] = time.perf_counter() - clock
    return Stages(tokenizer_info, sources, mixed, splits)


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


# The tokenizer of each config in this process: the driver loads it afresh for every build, and
# the tasks it runs in its own process use that one; a worker process elsewhere loads it once.
_tokenizers: dict = {}


def _tokenizer_key(config) -> str:
    return config.model_dump_json()  # the config holds a dict (chat_template_kwargs): unhashable


def _tokenizer_for(config):
    key = _tokenizer_key(config)
    if key not in _tokenizers:
        # The driver checked the template already; a task only encodes with the tokenizer.
        _tokenizers[key] = load_tokenizer(config, require_chat_template=False)
    return _tokenizers[key]


# --- stage: read + normalise + tokenize (cached per source partition) -------------------------


def cache_key(source, recipe: Recipe, tokenizer_info: TokenizerEntry, template: str) -> str:
    """Everything that changes a source's tokens; weights, filters and packing are not in it.
    ``template`` is the chat template with the recipe's chat_template_kwargs bound into it."""
    digest = hashlib.sha256()
    config = source.model_dump(mode="json", exclude={"weight", "min_tokens", "max_tokens", "name"})
    digest.update(
        json.dumps(
            [
                CACHE_VERSION,
                config,
                tokenizer_info.sha256,
                template,
                recipe.tokenizer.multi_turn,
                recipe.tokenizer.special_tokens_in_text,
            ],
            sort_keys=True,
        ).encode()
    )
    if isinstance(source, FileSource):
        digest.update(_content_fingerprint(resolve_path(source, Path(recipe.cache_dir))).encode())
    else:
        digest.update(__version__.encode())  # generated data changes with the generator
        for path, named in haystack_paths(
            source.haystack or (), Path(recipe.cache_dir), recipe.text_sources
        ):
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


def cache_entry(source, recipe: Recipe, key: str, share: tuple[int, int] = (0, 1)) -> Path:
    """Where a source's tokenized cache lives (an absolute path: tasks may run elsewhere);
    one entry per partition ``share = (i, n)`` when the source is cut in ``n``."""
    suffix = f"-part{share[0]}of{share[1]}" if share[1] > 1 else ""
    return Path(recipe.cache_dir).resolve() / "tokenized" / f"{source.name}-{key}{suffix}"


@dataclass(frozen=True)
class TokenizeJob:
    """One tokenize task: a whole source (``partition`` None) or one partition of it."""

    source: int
    entry: str
    partition: Partition | None = None


def tokenize_sources(
    recipe: Recipe,
    tokenizer,
    tokenizer_info: TokenizerEntry,
    executor: Executor,
    progress: Progress,
) -> list[TokenizedSource]:
    """The token cache of every source: its partitions' entries tokenized where missing."""
    keys = [
        cache_key(source, recipe, tokenizer_info, tokenizer.chat_template)
        for source in recipe.sources
    ]
    layouts = source_partitions(recipe, keys, executor, progress)
    for job in (job for jobs in layouts for job in jobs):
        if Path(job.entry).exists() and (problem := entry_problem(Path(job.entry))):
            progress.console.print(
                f"[yellow]note[/yellow] cached tokens of source "
                f"{recipe.sources[job.source].name} ({Path(job.entry).name}): {problem}; "
                "tokenizing it again",
                highlight=False,
                soft_wrap=True,
            )
            shutil.rmtree(job.entry)  # a cache entry of ours whose files no longer match
    missing = [job for jobs in layouts for job in jobs if not Path(job.entry).exists()]
    executor.map(tokenize_task, missing, recipe, progress, "tokenize")
    sources = []
    for source, jobs in zip(recipe.sources, layouts):
        entries = [job.entry for job in jobs]
        sources.append(
            TokenizedSource(
                source.name,
                source.kind,
                source.weight,
                open_cache(entries),
                not any(job in missing for job in jobs),
                entries,
            )
        )
    return sources


def source_partitions(
    recipe: Recipe, keys: list[str], executor: Executor, progress: Progress
) -> list[list[TokenizeJob]]:
    """The tokenize jobs of every source: one per partition, or one for the whole source.
    Partitions are planned once (rows counted by tasks where only reading tells) and remembered
    beside the cache entries, so a re-run finds the same entries without counting again."""
    wanted = executor.parallelism
    partitions: list[list[Partition] | None] = []
    plan_files, to_place = [], {}
    for index, (source, key) in enumerate(zip(recipe.sources, keys)):
        plan_file = cache_entry(source, recipe, key).with_name(
            f"{source.name}-{key}-partitions{wanted}.json"
        )
        plan_files.append(plan_file)
        # max_samples takes a source's first rows, which only a read from the start knows.
        if wanted == 1 or getattr(source, "max_samples", None):
            partitions.append(None)
        elif (remembered := _read_plan(plan_file)) is not None:
            partitions.append(remembered)
        else:
            path = (
                None
                if isinstance(source, AntiHaystackSource)
                else _absolute(resolve_path(source, Path(recipe.cache_dir)))
            )
            planned = plan_partitions(source, path, wanted)
            if planned is not None:  # None: a source read whole (text files)
                to_place[index] = planned
            partitions.append(None)
    uncounted = [p for planned in to_place.values() for p in planned if p.rows is None]
    counted = iter(executor.map(count_task, uncounted, None, progress, "count rows"))
    for index, planned in to_place.items():
        counts = [(p.rows, 0) if p.rows is not None else next(counted) for p in planned]
        partitions[index] = place(planned, counts, wanted)
        staging = plan_files[index].with_name(
            f"{plan_files[index].name}.{uuid.uuid4().hex}.partial"
        )
        staging.parent.mkdir(parents=True, exist_ok=True)
        plan = [dataclasses.asdict(p) for p in partitions[index]]
        staging.write_text(json.dumps({"sha256": _plan_digest(plan), "partitions": plan}))
        staging.replace(plan_files[index])
    jobs = []
    for index, (source, key, parts) in enumerate(zip(recipe.sources, keys, partitions)):
        if parts is None or len(parts) <= 1:
            jobs.append([TokenizeJob(index, str(cache_entry(source, recipe, key)))])
        else:
            jobs.append(
                [
                    TokenizeJob(index, str(cache_entry(source, recipe, key, (i, len(parts)))), part)
                    for i, part in enumerate(parts)
                ]
            )
    return jobs


def _plan_digest(plan: list[dict[str, Any]]) -> str:
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()


def _read_plan(plan_file: Path) -> list[Partition] | None:
    """The partitions remembered in ``plan_file``, or None when there is none or it does not match
    its checksum: an edited or torn plan (one changed digit moves a partition's bounds, and the
    rows between them would be read by no partition) is planned again, never trusted."""
    try:
        stored = json.loads(plan_file.read_text())
        plan = stored["partitions"]
        if stored["sha256"] != _plan_digest(plan):
            return None
        return [Partition(**dict(p, span=tuple(p["span"]))) for p in plan]
    # None too when it is not JSON or not a plan this version writes (an older plan is a list).
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


def _absolute(path: str) -> str:
    local = Path(path)
    return str(local.resolve()) if local.exists() else path  # a hub id stays as it is


def count_task(_, partition: Partition, progress: Progress | None) -> tuple[int, int]:
    """(rows, lines) of a partition whose row count only reading it tells."""
    return count_rows(partition)


def tokenize_task(recipe: Recipe, job: TokenizeJob, progress: Progress | None) -> None:
    """Tokenize one source or partition into its cache entry, unless it already exists."""
    entry = Path(job.entry)
    if entry.exists():
        return
    source = recipe.sources[job.source]
    tokenizer, _ = _tokenizer_for(recipe.tokenizer)
    advance = lambda records, tokens: None  # noqa: E731
    if progress is not None:
        total = (
            job.partition.rows
            if job.partition
            else source.count
            if isinstance(source, AntiHaystackSource)
            else source.max_samples
        )
        task = progress.add_task(f"tokenize {source.name}", total=total, rate="")
        started, seen_tokens = time.perf_counter(), 0

        def advance(records: int, tokens: int) -> None:
            nonlocal seen_tokens
            seen_tokens += tokens
            rate = seen_tokens / max(time.perf_counter() - started, 1e-9)
            progress.update(task, advance=records, rate=f"{rate / 1e3:,.0f}K tok/s")

    backend = tokenizer.backend_tokenizer
    records = read_source(
        source,
        cache_dir=Path(recipe.cache_dir).resolve(),
        partition=job.partition,
        count_tokens=lambda text: len(backend.encode(text, add_special_tokens=False)),
        text_sources=recipe.text_sources,
    )
    # A name of its own: a retried or duplicated task never writes into another's staging.
    staging = entry.with_name(f"{entry.name}.{uuid.uuid4().hex}.partial")
    tokenize_records(
        records,
        tokenizer,
        staging,
        multi_turn=recipe.tokenizer.multi_turn,
        max_samples=source.max_samples,
        on_progress=advance,
        special_tokens_in_text=recipe.tokenizer.special_tokens_in_text,
    )
    try:
        staging.rename(entry)
    except OSError:  # another attempt at the same share finished first: its entry is identical
        shutil.rmtree(staging, ignore_errors=True)
    if progress is not None:
        progress.update(task, total=progress.tasks[task].completed)


def open_cache(entries: Sequence[str]) -> TokenCache | PartitionedCache:
    """One source's cache: its entry, or its partitions' entries seen as one in source order."""
    if len(entries) == 1:
        return TokenCache(Path(entries[0]))
    return PartitionedCache([TokenCache(Path(entry)) for entry in entries])


# --- stage: mix ------------------------------------------------------------------------------


def mix_sources(
    sources: list[TokenizedSource], recipe: Recipe, console: Console | None = None
) -> Mix:
    """The mix of the tokenized sources; language_share warnings go to ``console``."""
    inputs = [
        SourceSamples(
            name=s.name,
            weight=s.weight,
            lengths=s.cache.lengths,
            text_hash=s.cache.text_hash,
            lang=s.cache.lang,
            min_tokens=config.min_tokens,
            max_tokens=config.max_tokens,
            tokens=_sample_tokens(s.cache),
            row=s.cache.position,
        )
        for s, config in zip(sources, recipe.sources)
    ]
    near = recipe.dedup.near
    mixed = mix(
        inputs,
        seed=recipe.seed,
        validation_fraction=recipe.validation.fraction,
        validation_max=recipe.validation.max_samples,
        dedup=recipe.dedup.exact,
        shuffle=recipe.packing.algorithm != "next_fit",
        language_share=recipe.language_share,
        language_share_mode=recipe.language_share_mode,
        near_duplicates=NearDuplicateFilter(near.threshold, near.num_perm, near.ngram)
        if near
        else None,
    )
    if console is not None and mixed.language is not None:
        for line in mixed.language.warnings(recipe.language_share_warn):
            console.print(f"[yellow]warning[/yellow] {line}", highlight=False)
    return mixed


def _sample_tokens(cache):
    def tokens(sample: int) -> np.ndarray:
        return cache.tokens(sample, 0, int(cache.lengths[sample]))[0]

    return tokens


# --- stage: plan -----------------------------------------------------------------------------


def split_layout(recipe: Recipe, mixed: Mix):
    """(split name, samples, max_seq_len, over-length policy, stage name, bucket edges): the
    arguments of ``plan_split`` for every split to write."""
    stages = recipe.packing.stages or (None,)
    for stage in stages:
        max_len = stage.max_seq_len if stage else recipe.packing.max_seq_len
        overlength = (stage.overlength if stage else None) or recipe.packing.overlength
        requested = (stage.buckets if stage and stage.buckets else recipe.packing.buckets) or ()
        edges = sorted({e for e in requested if e < max_len} | {max_len})
        for kind, samples in (("train", mixed.train), ("validation", mixed.validation)):
            if len(samples):
                yield (
                    split_name(stage.name if stage else None, kind),
                    samples,
                    max_len,
                    overlength,
                    stage.name if stage else None,
                    edges,
                )


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
    overlength: OverlengthCounts

    def bucket_rows(self) -> list[tuple[str, np.ndarray]]:
        """(stream name, row indices) for every bucket that holds rows."""
        named = zip(packing.bucket_names(self.edges), range(len(self.edges)))
        return [(name, rows) for name, b in named if len(rows := np.flatnonzero(self.buckets == b))]

    def result(self, streams: list[StreamStats]) -> SplitEntry:
        """The split's manifest entry, once its streams are written."""
        total_tokens = sum(s.tokens for s in streams)
        for stream in streams:
            stream.proportion = stream.tokens / total_tokens if total_tokens else 0.0
        return SplitEntry(
            name=self.name,
            max_seq_len=self.max_len,
            stage=self.stage,
            streams=tuple(StreamEntry(**dataclasses.asdict(s)) for s in streams),
            samples=len(self.samples),
            totals=SplitTotals(
                rows=sum(s.rows for s in streams),
                tokens=total_tokens,
                target_tokens=sum(s.target_tokens for s in streams),
            ),
            overlength=self.overlength,
            packing=packing.packing_stats(self.plan, self.pieces.length, self.max_len),
        )


def plan_split(
    name: str,
    samples: SampleList,
    max_len: int,
    overlength: str,
    stage: str | None,
    edges: list[int],
    caches: list,
    recipe: Recipe,
) -> SplitPlan:
    cuttable = (
        (
            gather_column(caches, "user_start", samples.source, samples.index),
            gather_column(caches, "user_end", samples.source, samples.index),
        )
        if overlength == "truncate_middle"
        else None
    )
    pieces = packing.fit_to_length(samples.length, max_len, overlength, cuttable)
    pieces, no_target = _drop_targetless_cuts(pieces, samples, caches)
    plan = packing.plan(
        pieces.length, max_len, algorithm=recipe.packing.algorithm, seed=recipe.seed
    )
    buckets = packing.assign_buckets(plan.row_max_item_lengths(pieces.length), edges)
    counts = OverlengthCounts(
        policy=overlength,
        truncated=pieces.truncated,
        dropped=pieces.dropped,
        split=pieces.split,
        middle_cut=pieces.middle_cut,
        empty=pieces.empty,
        no_target_after_cut=no_target,
    )
    return SplitPlan(name, max_len, stage, samples, pieces, plan, buckets, edges, counts)


def _drop_targetless_cuts(
    pieces: packing.Pieces, samples: SampleList, caches: list
) -> tuple[packing.Pieces, int]:
    """A truncated or split-off piece may hold no assistant token at all; it would cost compute
    and teach nothing, so it is removed and counted."""
    cut = np.flatnonzero((pieces.start > 0) | (pieces.length < samples.length[pieces.sample]))
    empty = [i for i in cut.tolist() if not piece_mask(pieces, i, samples, caches).any()]
    if not empty:
        return pieces, 0
    keep = np.ones(len(pieces), dtype=bool)
    keep[empty] = False
    return pieces.select(keep), len(empty)


# --- stages: write stream slices, merge ------------------------------------------------------


@dataclass
class SplitWriter:
    """What every write task of one split shares: the plan and where the caches are."""

    split: SplitPlan
    entries: list[list[str]]
    compression: str | None
    size_limit: int
    rows: int
    bar: Any = None  # the progress bar of this split's rows, when its tasks run in the driver
    caches: list | None = (
        None  # open caches: memory maps, which stay in the process that opened them
    )

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "caches": None}

    def open_caches(self) -> list:
        if self.caches is None:
            self.caches = [open_cache(entries) for entries in self.entries]
        return self.caches


@dataclass(frozen=True)
class WriteJob:
    """Rows ``rows`` (contiguous stream rows) of one bucket stream, into ``destination``."""

    bucket: str
    rel_path: str
    rows: np.ndarray
    destination: str


def write_split(
    split: SplitPlan,
    sources: list[TokenizedSource],
    recipe: Recipe,
    out_root: Path,
    executor: Executor,
    progress: Progress,
) -> list[StreamStats]:
    """Write each bucket's rows as one MDS stream: cut into ``executor.parallelism`` contiguous
    slices written by separate tasks into ``<stream>/part-<i>`` and joined by ``merge_index``,
    or (one slice) written straight into the stream directory."""
    jobs, slices = [], []
    for bucket, rows in split.bucket_rows():
        rel_path = f"{split.name}/{bucket}"
        count = min(executor.parallelism, len(rows))
        slices.append((bucket, rel_path, count))
        for i in range(count):
            part = f"part-{i:05d}" if count > 1 else ""
            jobs.append(
                WriteJob(
                    bucket,
                    rel_path,
                    rows[i * len(rows) // count : (i + 1) * len(rows) // count],
                    str(inside(out_root, rel_path) / part),
                )
            )
    writer = SplitWriter(
        split,
        [s.entries for s in sources],
        recipe.output.compression,
        recipe.output.shard_size_limit,
        sum(len(j.rows) for j in jobs),
        caches=[s.cache for s in sources],
    )
    written = iter(executor.map(write_task, jobs, writer, progress, f"write {split.name}"))
    streams = []
    for bucket, rel_path, count in slices:
        parts = [next(written) for _ in range(count)]
        if count > 1:
            stream_dir = out_root / rel_path
            merge_index(
                [stream_dir / f"part-{i:05d}" / "index.json" for i in range(count)], stream_dir
            )
        streams.append(
            StreamStats(
                name=bucket,
                path=rel_path,
                **{
                    k: sum(getattr(p, k) for p in parts)
                    for k in ("rows", "samples", "tokens", "target_tokens")
                },
            )
        )
    return streams


def write_task(writer: SplitWriter, job: WriteJob, progress: Progress | None) -> StreamStats:
    """One slice of one stream; its part directory is replaced, so a retry rewrites it whole."""
    split = writer.split
    assembler = RowAssembler(split.pieces, split.samples, writer.open_caches())
    destination = Path(job.destination)
    shutil.rmtree(destination, ignore_errors=True)  # a part of this build's own partial output
    if progress is not None and writer.bar is None:  # one bar for all slices of the split
        writer.bar = progress.add_task(f"write {split.name}", total=writer.rows, rate="")

    def assembled():
        for row in job.rows.tolist():
            yield assembler.row(split.plan[row])
            if progress is not None:
                progress.advance(writer.bar)

    return write_stream(
        assembled(),
        destination,
        name=job.bucket,
        rel_path=job.rel_path,
        compression=writer.compression,
        size_limit=writer.size_limit,
    )
