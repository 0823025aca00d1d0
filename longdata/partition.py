"""Partitioned builds: N workers (machines or processes) share one build, then ``merge`` joins it.

    phase 1  worker i tokenizes the source rows at positions i, i+N, i+2N, ... into its own
             cache entry (the expensive part, split N ways);
    phase 2  every worker waits for all N entries and computes the same global mix and packing
             plan from their per-sample metadata (lengths, hashes, languages) alone;
    phase 3  worker i writes the i-th contiguous slice of every bucket stream's rows into
             ``<stream>/part-<i>``, reading each row's tokens from whichever entry holds them;
    merge    ``streaming.base.util.merge_index`` joins each stream's parts in worker order, and
             the manifest and card are written exactly as a single-process build writes them.

The rows, their order and the manifest equal a single-process build of the same recipe; only
the shard files are cut differently. Workers need a shared ``cache_dir`` and output directory
(a shared filesystem); they exchange nothing but files there.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from rich.console import Console

from longdata.build import (
    BuildError,
    BuildResult,
    TokenizedSource,
    _progress,
    cache_entry,
    finish_build,
    mix_sources,
    needed_paths,
    plan_split,
    split_layout,
    tokenize_source,
    write_split,
)
from longdata.format import inside, is_ours, mark_ours
from longdata.format.paths import NotOursError
from longdata.output import claim_output, output_lock, partial_dir
from longdata.recipe import Recipe, validate_recipe
from longdata.sample_index import write_sample_index
from longdata.shards import StreamStats
from longdata.templates import load_tokenizer
from longdata.tokenize import PartitionedCache, TokenCache

WORKERS_DIR = ".workers"  # inside the shared partial output: each worker's report, the recipe
POLL_SECONDS = 2.0


def _shared_partial(recipe: Recipe, out: str | Path | None, overwrite: bool) -> tuple[Path, Path]:
    """The output directory and the partial build all workers share (made by the first)."""
    out_dir = Path(out or recipe.output.dir)
    if "://" in str(out_dir):
        raise BuildError("a partitioned build writes to a shared filesystem; upload the merged build")
    claim_output(out_dir, overwrite=overwrite, keep=needed_paths(recipe))
    partial = partial_dir(out_dir)
    if not partial.exists():
        partial.mkdir(parents=True, exist_ok=True)
        mark_ours(partial, "partial")
    elif not is_ours(partial, "partial"):
        raise NotOursError(f"{partial} exists and was not written by longdata; remove it yourself "
                           "or choose another --out")
    return out_dir, partial


def build_worker(recipe: Recipe, *, workers: int, worker_index: int, out: str | Path | None = None,
                 overwrite: bool = False, console: Console | None = None,
                 timeout: float = 24 * 3600) -> Path:
    """Run phases 1-3 for one worker; returns the report file ``merge`` reads. Workers share the
    partial build by design, so they take no lock; ``merge`` does."""
    if not 0 <= worker_index < workers:
        raise BuildError(f"--worker-index must be in [0, {workers}), got {worker_index}")
    if any(getattr(s, "max_samples", None) for s in recipe.sources):
        raise BuildError("max_samples counts a source's rows in order, which a partitioned build "
                         "cannot do; remove it or build in one process")
    console = console or Console(stderr=True)
    out_dir, partial = _shared_partial(recipe, out, overwrite)
    reports = partial / WORKERS_DIR
    reports.mkdir(parents=True, exist_ok=True)
    (reports / "recipe.json").write_text(json.dumps(recipe.model_dump(mode="json"), sort_keys=True))
    tokenizer, tokenizer_info = load_tokenizer(recipe.tokenizer, recipe.has_chat_sources)
    template = tokenizer.chat_template
    with _progress(console) as progress:
        own = [tokenize_source(s, recipe, tokenizer, tokenizer_info, progress, share=(worker_index, workers))
               for s in recipe.sources]
        sources = [
            TokenizedSource(s.name, s.kind, s.weight, PartitionedCache(
                [_wait_for(cache_entry(s, recipe, tokenizer_info, template, (j, workers)), timeout)
                 for j in range(workers)]), mine.cached)
            for s, mine in zip(recipe.sources, own)]
        mixed = mix_sources(sources, recipe)
        caches = [s.cache for s in sources]
        streams = {}
        for layout in split_layout(recipe, mixed):
            split = plan_split(*layout, caches, recipe)
            written = write_split(split, caches, recipe, partial, progress, share=(worker_index, workers))
            streams[split.name] = [s.as_dict() for s in written]
    report = reports / f"worker-{worker_index:05d}.json"
    staging = report.with_suffix(".partial")
    staging.write_text(json.dumps({"workers": workers, "streams": streams}, sort_keys=True))
    staging.rename(report)
    return report


def _wait_for(entry: Path, timeout: float) -> TokenCache:
    deadline = time.monotonic() + timeout
    while not entry.exists():
        if time.monotonic() > deadline:
            raise BuildError(f"timed out waiting for another worker's cache entry {entry}")
        time.sleep(POLL_SECONDS)
    return TokenCache.open_checked(entry)


def merge(out: str | Path, console: Console | None = None, overwrite: bool = False) -> BuildResult:
    """Join the workers' parts of the build at ``out`` and publish it."""
    out_dir = Path(out)
    with output_lock(out_dir):
        return _merge(out_dir, overwrite)


def _merge(out_dir: Path, overwrite: bool) -> BuildResult:
    from streaming.base.util import merge_index

    partial = partial_dir(out_dir)
    reports_dir = partial / WORKERS_DIR
    if not is_ours(partial, "partial") or not (reports_dir / "recipe.json").exists():
        raise BuildError(f"{partial}: no partitioned build in progress for {out_dir}")
    recipe = validate_recipe(json.loads((reports_dir / "recipe.json").read_text()))
    claim_output(out_dir, overwrite=overwrite, keep=needed_paths(recipe))
    reports = [json.loads(p.read_text()) for p in sorted(reports_dir.glob("worker-*.json"))]
    workers = reports[0]["workers"] if reports else 0
    if not reports or len(reports) != workers:
        raise BuildError(f"{len(reports)} of {workers or '?'} workers have finished; merge after all of them")
    started_at, seconds = time.time(), {}
    tokenizer, tokenizer_info = load_tokenizer(recipe.tokenizer, recipe.has_chat_sources)
    sources = [
        TokenizedSource(s.name, s.kind, s.weight, PartitionedCache(
            [TokenCache.open_checked(cache_entry(s, recipe, tokenizer_info, tokenizer.chat_template,
                                                 (j, workers)))
             for j in range(workers)]), True)
        for s in recipe.sources]
    mixed = mix_sources(sources, recipe)
    splits = []
    for layout in split_layout(recipe, mixed):
        split = plan_split(*layout, [s.cache for s in sources], recipe)
        streams = []
        for index, (bucket, _) in enumerate(split.bucket_rows()):
            parts = [StreamStats(**report["streams"][split.name][index]) for report in reports]
            stream_dir = inside(partial, parts[0].path)
            merge_index([str(stream_dir / f"part-{w:05d}" / "index.json") for w in range(workers)],
                        str(stream_dir))
            streams.append(StreamStats(name=bucket, path=parts[0].path,
                                       **{k: sum(getattr(p, k) for p in parts)
                                          for k in ("rows", "samples", "tokens", "target_tokens")}))
        splits.append(split.result(streams))
        write_sample_index(split, [s.cache for s in sources], [s.name for s in sources], partial)
    shutil.rmtree(reports_dir)
    return finish_build(recipe, tokenizer_info, sources, mixed, splits, partial, out_dir, None,
                        seconds, started_at)
