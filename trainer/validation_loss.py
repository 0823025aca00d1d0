"""Validation loss of a model on a build's split, per source, per length bucket and overall.

Every row of every stream of the split is read once, in order (no proportions, no shuffling),
collated as in training and run with packing metadata, so samples never see each other. The
loss of a sample is the next-token cross-entropy of its target tokens (its `loss_mask`, the
assistant text and end-of-turn), exactly what training minimises. Reported per group:

- `token_mean`: sum of target-token losses / target tokens (long samples weigh more);
- `sequence_mean`: the mean over samples with targets of each sample's mean target-token loss
  (every sample counts once; the LongAlign weighting of `--loss sequence_mean`);
- `perplexity`: exp(token_mean).

Groups: every source of the manifest (by the samples' `source_ids`), every stream of the split
(the row length buckets `le_008192`, ...: rows of at most that many tokens), every sample-length
bucket (a sample of n tokens falls in `(2^(k-1), 2^k]`, labelled e.g. `8K-16K`), and `all`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from longdata.format import Manifest, check_stream_files
from longdata.format.mds import StreamReader
from longdata.trainer.collation import collate
from longdata.trainer.loss import model_token_losses

MIN_LENGTH_BUCKET = 1024


@dataclass
class SampleLoss:
    """One sample's summed target-token loss and where it came from."""

    source: int
    stream: str
    tokens: int  # the sample's length
    targets: int  # its target tokens
    loss_sum: float


@dataclass
class LossStats:
    samples: int = 0
    samples_with_targets: int = 0
    target_tokens: int = 0
    loss_sum: float = 0.0
    sample_mean_sum: float = 0.0  # sum over samples with targets of their mean loss

    def add(self, sample: SampleLoss) -> None:
        self.samples += 1
        self.target_tokens += sample.targets
        self.loss_sum += sample.loss_sum
        if sample.targets:
            self.samples_with_targets += 1
            self.sample_mean_sum += sample.loss_sum / sample.targets

    @property
    def token_mean(self) -> float | None:
        return self.loss_sum / self.target_tokens if self.target_tokens else None

    @property
    def sequence_mean(self) -> float | None:
        if not self.samples_with_targets:
            return None
        return self.sample_mean_sum / self.samples_with_targets

    @property
    def perplexity(self) -> float | None:
        mean = self.token_mean
        return None if mean is None else math.exp(min(mean, 700.0))

    def as_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "samples_with_targets": self.samples_with_targets,
            "target_tokens": self.target_tokens,
            "token_mean": self.token_mean,
            "sequence_mean": self.sequence_mean,
            "perplexity": self.perplexity,
        }


def length_bucket(tokens: int) -> str:
    """`(2^(k-1), 2^k]` as e.g. "8K-16K"; everything up to 1K is "<=1K"."""
    if tokens <= MIN_LENGTH_BUCKET:
        return "<=1K"
    upper = 1 << (tokens - 1).bit_length()
    return f"{_short(upper // 2)}-{_short(upper)}"


def _short(tokens: int) -> str:
    if tokens >= 1 << 20:
        return f"{tokens >> 20}M"
    return f"{tokens >> 10}K"


@dataclass
class LossReport:
    split: str
    sources: list[str]
    rows: int = 0
    samples: list[SampleLoss] = field(default_factory=list)

    def _group(self, key: Callable[[SampleLoss], str]) -> dict[str, LossStats]:
        groups: dict[str, LossStats] = {}
        for sample in self.samples:
            groups.setdefault(key(sample), LossStats()).add(sample)
        return groups

    def overall(self) -> LossStats:
        stats = LossStats()
        for sample in self.samples:
            stats.add(sample)
        return stats

    def by_source(self) -> dict[str, LossStats]:
        groups = self._group(lambda s: self.source_name(s.source))
        order = [*self.sources, *sorted(set(groups) - set(self.sources))]
        return {name: groups[name] for name in order if name in groups}

    def by_stream(self) -> dict[str, LossStats]:
        return dict(sorted(self._group(lambda s: s.stream).items()))

    def by_length(self) -> dict[str, LossStats]:
        groups = self._group(lambda s: length_bucket(s.tokens))
        lower_bound = {length_bucket(s.tokens): s.tokens for s in self.samples}
        return dict(sorted(groups.items(), key=lambda item: lower_bound[item[0]]))

    def source_name(self, index: int) -> str:
        return self.sources[index] if 0 <= index < len(self.sources) else f"source_{index}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "rows": self.rows,
            "all": self.overall().as_dict(),
            "by_source": {k: v.as_dict() for k, v in self.by_source().items()},
            "by_stream": {k: v.as_dict() for k, v in self.by_stream().items()},
            "by_sample_length": {k: v.as_dict() for k, v in self.by_length().items()},
            "samples": [asdict(s) for s in self.samples],
        }


def default_split(manifest: Manifest) -> str | None:
    """The first validation split in stage order (`validation`, or the first stage's
    `<stage>/validation`); None if the build has none."""
    splits = manifest.validation_splits()
    return splits[0] if splits else None


def split_rows(manifest: Manifest, split: str) -> int:
    return manifest.split(split).rows


def iter_rows(manifest: Manifest, split: str) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """(stream name, row) for every row of every stream of `split`, each exactly once."""
    for entry in manifest.split(split).streams:
        if entry.rows == 0:
            continue
        stream_dir = manifest.stream_dir(entry)
        check_stream_files(stream_dir)
        reader = StreamReader(stream_dir)
        for index in range(reader.rows):
            yield entry.name, reader.row(index)


def _batches(
    rows: Iterator[tuple[str, dict[str, np.ndarray]]], batch_size: int
) -> Iterator[tuple[str, list[dict[str, np.ndarray]]]]:
    """Consecutive rows of one stream, at most `batch_size` at a time."""
    stream, batch = None, []
    for name, row in rows:
        if batch and (name != stream or len(batch) == batch_size):
            yield stream, batch
            batch = []
        stream = name
        batch.append(row)
    if batch:
        yield stream, batch


@torch.inference_mode()
def evaluate_loss(
    model: torch.nn.Module,
    manifest: Manifest,
    split: str,
    *,
    batch_size: int = 1,
    on_rows: Callable[[int], None] | None = None,
) -> LossReport:
    """Run every row of `split` through `model` and keep every sample's summed target loss."""
    model.eval()
    device = next(model.parameters()).device
    report = LossReport(split=split, sources=manifest.source_names)
    for stream, rows in _batches(iter_rows(manifest, split), batch_size):
        batch = collate(rows)
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        losses = model_token_losses(model, inputs)
        counts = batch["sample_target_counts"]
        sums = torch.zeros(len(counts), dtype=torch.float64)
        sums.index_add_(0, losses.sample_ids.cpu(), losses.values.double().cpu())
        lengths = [int(n) for row in rows for n in row["seq_lens"]]
        for index, (source, length) in enumerate(
            zip(batch["sample_source_ids"].tolist(), lengths, strict=True)
        ):
            report.samples.append(
                SampleLoss(source, stream, length, int(counts[index]), float(sums[index]))
            )
        report.rows += len(rows)
        if on_rows is not None:
            on_rows(len(rows))
    return report


def loss_table(report: LossReport, title: str) -> Any:
    """A rich table: all, then per source, per stream and per sample length (loss/token is the
    token mean, loss/seq the sequence mean, ppl exp(token mean))."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(title), title_justify="left")
    for column in ("group", "samples", "targets", "loss/token", "loss/seq", "ppl"):
        table.add_column(column, justify="left" if column == "group" else "right")

    def number(value: float | None, digits: int = 4) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    def add(name: str, stats: LossStats) -> None:
        table.add_row(
            escape(name),
            f"{stats.samples:,}",
            f"{stats.target_tokens:,}",
            number(stats.token_mean),
            number(stats.sequence_mean),
            number(stats.perplexity, 1),
        )

    add("all", report.overall())
    for group, stats_by_name in (
        ("source", report.by_source()),
        ("stream", report.by_stream()),
        ("length", report.by_length()),
    ):
        table.add_section()
        for name, stats in stats_by_name.items():
            add(f"{group} {name}", stats)
    return table
