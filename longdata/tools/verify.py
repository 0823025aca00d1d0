"""``longdata verify``: re-read a whole build and report anything that does not add up.

Checks, per shard: file sizes and hashes against the stream's index.json; every row against the
row contract and against the split's sample index (its pieces, in order); per stream and split,
the rows/tokens/targets against the manifest; and per source, that every row read is accounted
for (``longdata.stages.accounting``) and that the split indexes hold the samples the accounting
says. Shards are decompressed in memory by longdata's own reader, which refuses shards whose
columns are not the row schema before decoding: verifying runs no code from a build and writes
nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from longdata.format import (
    BuildFormatError,
    Manifest,
    ShardError,
    check_row,
    inside,
    load_shard,
    split_name,
)
from longdata.format.mds import decode_row, read_index, shard_file
from longdata.stages.accounting import accounting_problems
from longdata.stages.sample_index import INDEX_FILE, read_sample_index


@dataclass
class VerifyReport:
    build_dir: Path
    shards: int = 0
    rows: int = 0
    tokens: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_build(build_dir: str | Path) -> VerifyReport:
    build_dir = Path(build_dir)
    report = VerifyReport(build_dir)
    try:
        manifest = Manifest.read(build_dir)
    except BuildFormatError as exc:
        report.problems.append(str(exc))
        return report
    n_sources = len(manifest.source_names)
    for name, split in manifest.splits.items():
        split_totals = {"rows": 0, "tokens": 0, "target_tokens": 0}
        layouts = _indexed_layouts(build_dir, name, report)
        for stream in split.streams:
            counted = _verify_stream(
                manifest.stream_dir(stream),
                split.max_seq_len,
                n_sources,
                report,
                layouts.get(stream.name, {}),
            )
            for key in ("rows", "tokens", "target_tokens", "samples"):
                recorded = getattr(stream, key)
                if recorded is not None and counted[key] != recorded:
                    report.problems.append(
                        f"{stream.path}: manifest says {key}={recorded}, shards hold {counted[key]}"
                    )
            for key in split_totals:
                split_totals[key] += counted[key]
        for key, value in split_totals.items():
            recorded = getattr(split.totals, key) if split.totals else value
            if recorded != value:
                report.problems.append(
                    f"split {name}: manifest says {key}={recorded}, streams add up to {value}"
                )
    report.problems.extend(row_accounting_problems(build_dir, manifest))
    return report


def row_accounting_problems(build_dir: Path, manifest: Manifest) -> list[str]:
    """Each source's row identity, and its held-out and training samples against every split's
    sample index (a validation split holds each held-out sample once; a train split each weighted
    training sample once)."""
    problems = [p for source in manifest.sources for p in accounting_problems(source)]
    if any(source.mix is None for source in manifest.sources):
        return problems  # no mix stats to hold the sample indexes against (already reported)
    names = manifest.source_names
    for stage in manifest.stages():
        for kind, expected in (
            ("validation", {s.name: s.mix.validation for s in manifest.sources}),
            ("train", {s.name: s.mix.train_samples for s in manifest.sources}),
        ):
            split = split_name(stage, kind)
            held = dict.fromkeys(names, 0)
            index = inside(build_dir, f"{split}/{INDEX_FILE}")
            if index.exists():
                try:
                    table = read_sample_index(build_dir, split, ["sample", "source"])
                except BuildFormatError as error:
                    problems.append(str(error))
                    continue
                counts = pl.from_arrow(table).unique("sample").group_by("source").len()
                held.update(dict(counts.iter_rows()))
            for name in names:
                if held[name] != expected[name]:
                    problems.append(
                        f"split {split}: the sample index holds {held[name]} samples of "
                        f"source {name}, the manifest's mix {expected[name]}"
                    )
    return problems


def _indexed_layouts(build_dir: Path, split: str, report: VerifyReport) -> dict[str, dict]:
    """{stream: {row: (piece lengths, source ids)}} from the split's sample index."""
    path = inside(build_dir, f"{split}/{INDEX_FILE}")
    if not path.exists():
        report.problems.append(f"{path}: missing sample index")
        return {}
    layouts: dict[str, dict] = {}
    try:
        table = read_sample_index(build_dir, split)
    except BuildFormatError as error:
        report.problems.append(str(error))
        return {}
    packed = (
        pl.from_arrow(table)
        .filter(pl.col("row") >= 0)
        .sort("stream", "row", "slot")
        .group_by("stream", "row", maintain_order=True)
        .agg("tokens", "source_id")
    )
    for stream, row, tokens, sources in packed.iter_rows():
        layouts.setdefault(stream, {})[row] = (tokens, sources)
    return layouts


def _verify_stream(
    stream_dir: Path,
    max_seq_len: int,
    n_sources: int,
    report: VerifyReport,
    layout: dict[int, tuple[list, list]],
) -> dict[str, int]:
    counted = {"rows": 0, "tokens": 0, "target_tokens": 0, "samples": 0}
    for where, index, row in iter_stream_rows(stream_dir, report.problems):
        if index == 0:
            report.shards += 1
        problem = check_row(row, max_seq_len, n_sources)
        if problem:
            report.problems.append(f"{where} row {index}: {problem}")
        indexed = layout.get(counted["rows"])
        if indexed != (row["seq_lens"].tolist(), row["source_ids"].tolist()):
            report.problems.append(
                f"{where} row {index}: the sample index lists {indexed} "
                f"(lengths, sources), the row holds {row['seq_lens'].tolist()}, "
                f"{row['source_ids'].tolist()}"
            )
        counted["rows"] += 1
        counted["samples"] += len(row["seq_lens"])
        counted["tokens"] += len(row["input_ids"])
        counted["target_tokens"] += int(row["loss_mask"].sum())
    if len(layout) != counted["rows"]:
        report.problems.append(
            f"{stream_dir}: the sample index lists {len(layout)} rows, "
            f"the shards hold {counted['rows']}"
        )
    report.rows += counted["rows"]
    report.tokens += counted["tokens"]
    return counted


def iter_stream_rows(stream_dir: Path, problems: list[str]):
    """(shard path, row index in shard, row) for every row of an MDS stream, in order, after
    checking each shard's columns, size and hashes against the index (failures go to
    ``problems``). Decoding is longdata's own (``longdata.format.mds``): nothing in a shard is
    ever unpickled or run, so verifying a build someone else made is safe."""
    try:
        shards = read_index(stream_dir)
    except ShardError as exc:
        problems.append(str(exc))
        return
    for shard in shards:
        try:
            where = shard_file(stream_dir, shard["zip_data"] or shard["raw_data"])
            data = load_shard(stream_dir, shard)
        except ShardError as exc:
            problems.append(str(exc))
            continue
        for index in range(shard["samples"]):
            yield where, index, decode_row(data, shard, index)
