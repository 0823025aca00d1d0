"""The data card: what went into a build and how it was packed, as a Hugging Face style dataset card
(Markdown with YAML front matter) with matplotlib plots.

Everything is computed with polars from two things a build directory holds, so ``longdata card``
can regenerate the card of any finished build: ``manifest.json`` and the per-split sample indexes
(``<split>/samples.parquet``, see docs/ROW_SCHEMA.md).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import yaml

from longdata.format import BuildFormatError, Manifest, check_slug, inside, is_ours, mark_ours
from longdata.format.paths import NotOursError, UnsafePathError, replace_file
from longdata.stages.accounting import ROW_FATES, accounting_problems
from longdata.stages.sample_index import read_sample_index

CARD_FILE = "README.md"
PLOTS_DIR = (
    "card"  # inside a build directory; a copy under data_cards/<name>/ keeps plots beside the card
)
PLOTS = ("lengths.png", "packing.png", "loss_weight.png", "mix.png")
LENGTH_BINS_PER_DECADE = 12


@dataclass
class CardData:
    """What the card is computed from, each table derived once per split."""

    manifest: Manifest  # splits in stage (curriculum) order, the order the card lists them in
    index: dict[str, pl.DataFrame]  # split -> its sample index (one line per piece)
    samples: dict[str, pl.DataFrame]  # split -> one line per sample, its pieces folded together
    rows: dict[str, pl.DataFrame]  # split -> one line per packed row: stream, tokens, samples
    loss_weights: dict[str, pl.DataFrame]  # split -> packed pieces with their loss shares

    @classmethod
    def read(cls, build_dir: Path, checked: Manifest | None = None) -> CardData:
        manifest = checked or Manifest.read(build_dir)
        missing = manifest.missing_build_records()
        if missing:
            raise BuildFormatError(
                f"{build_dir}/manifest.json: no {', '.join(missing[:3])}"
                f"{f' (and {len(missing) - 3} more)' if len(missing) > 3 else ''}; a card needs "
                "the manifest `longdata build` writes"
            )
        index = {
            name: pl.from_arrow(read_sample_index(build_dir, name)) for name in manifest.splits
        }
        return cls(
            manifest,
            index,
            samples={name: _per_sample(pieces) for name, pieces in index.items()},
            rows={name: _per_row(pieces) for name, pieces in index.items()},
            loss_weights={name: _loss_weights(pieces) for name, pieces in index.items()},
        )

    @property
    def source_names(self) -> list[str]:
        return list(self.manifest.source_names)

    @property
    def train_splits(self) -> list[str]:
        return self.manifest.training_splits()

    @property
    def plotted_splits(self) -> list[str]:
        """The train splits, or the first split of a build without one."""
        return self.train_splits or self.manifest.split_names[:1]


def _per_sample(pieces: pl.DataFrame) -> pl.DataFrame:
    return pieces.group_by("sample", maintain_order=True).agg(
        pl.col("source", "lang", "sample_tokens", "status").first(),
        pl.col("target_tokens").sum(),
        (pl.col("row") >= 0).any().alias("packed"),
    )


def _per_row(pieces: pl.DataFrame) -> pl.DataFrame:
    return (
        pieces.filter(pl.col("row") >= 0)
        .group_by("stream", "row", maintain_order=True)
        .agg(pl.col("tokens").sum(), pl.len().alias("samples"))
    )


def write_card(build_dir: Path, manifest: Manifest | None = None) -> Path:
    """Write ``<build_dir>/README.md`` and its plots under ``<build_dir>/card/``."""
    data = CardData.read(build_dir, manifest)
    plots = inside(build_dir, PLOTS_DIR)
    plots.mkdir(parents=True, exist_ok=True)
    _plot_lengths(data, plots / "lengths.png")
    _plot_packing(data, plots / "packing.png")
    _plot_loss_weight(data, plots / "loss_weight.png")
    _plot_mix(data, plots / "mix.png")
    card = build_dir / CARD_FILE
    replace_file(card, render_card(data, image_prefix=f"{PLOTS_DIR}/").encode())
    return card


def card_destination(card_dir: str | Path, name: str) -> Path:
    """Where a build's card is copied: ``<card_dir>/<name>``. A relative ``card_dir`` is relative
    to the working directory (like ``output.dir`` and ``cache_dir``); ``name`` must be a slug."""
    return Path(card_dir) / check_slug(name, "recipe name")


def check_card_destination(build_dir: Path, destination: Path) -> None:
    """Refuse (NotOursError) a card directory that is the build or inside it, or that exists and
    holds no card marker of longdata's: only the marker says a directory is a card copy, so one
    written before markers existed is refused too (remove it once, and the next copy is marked)."""
    build = Path(build_dir).resolve()
    target = destination.resolve()
    if target == build or build in target.parents:
        raise NotOursError(f"card directory {destination} is inside the build {build_dir}")
    if (destination.exists() or destination.is_symlink()) and not is_ours(destination, "card"):
        raise NotOursError(
            f"{destination} exists and is not a data card longdata wrote (no .longdata card "
            "marker); refusing to write into it (remove it or set output.card_dir elsewhere)"
        )


def copy_card(build_dir: Path, destination: Path) -> Path:
    """The build's card as ``<destination>/README.md`` with its plots beside it (data_cards/).

    Only the card's own files are written, each replaced rather than written through (a link
    planted there is replaced, its target untouched); nothing is removed. ``destination`` must
    pass ``check_card_destination``."""
    check_card_destination(build_dir, destination)
    destination.mkdir(parents=True, exist_ok=True)
    mark_ours(destination, "card")
    for plot in PLOTS:
        replace_file(destination / plot, (build_dir / PLOTS_DIR / plot).read_bytes())
    text = (build_dir / CARD_FILE).read_text(encoding="utf-8")
    replace_file(destination / CARD_FILE, text.replace(f"]({PLOTS_DIR}/", "](").encode())
    return destination / CARD_FILE


def recorded_card_destination(manifest: Manifest) -> Path:
    """``<card_dir>/<name>`` as a build's manifest recorded them. The manifest may have been
    edited, so its ``card_dir`` must be relative and stay inside the working directory."""
    card_dir = manifest.recipe.card_dir if manifest.recipe else None
    if card_dir is None:
        raise BuildFormatError(
            f"{manifest.build_dir}/manifest.json records no recipe.output.card_dir; "
            "pass --copy-to DIR or --no-copy"
        )
    destination = card_destination(card_dir, manifest.name)
    try:
        inside(Path.cwd(), card_dir)
    except UnsafePathError:
        raise UnsafePathError(
            f"{manifest.build_dir}/manifest.json records card_dir {card_dir!r}, outside the "
            "working directory; pass --copy-to DIR or --no-copy"
        ) from None
    return destination


def regenerate_card(build_dir: Path, copy_to: Path | None = None, copy: bool = True) -> list[Path]:
    """``longdata card``: rewrite the card inside the build and, with ``copy``, copy it to
    ``copy_to`` or to ``<card_dir>/<name>`` as the build's recipe recorded them."""
    manifest = Manifest.read(build_dir)
    destination = (copy_to or recorded_card_destination(manifest)) if copy else None
    if destination is not None:  # refused before the build's own card is rewritten
        check_card_destination(build_dir, destination)
    written = [write_card(build_dir, manifest)]
    if destination is not None:
        written.append(copy_card(build_dir, destination))
    return written


def render_card(data: CardData, image_prefix: str) -> str:
    m = data.manifest
    tokenizer = m.tokenizer
    sections = [
        _front_matter(data),
        f"# {m.name}: a packed long-context SFT build",
        "",
        f"Built by longdata {m.versions['longdata']} from recipe `{m.name}`: "
        f"{m.totals.samples:,} samples ({m.totals.tokens:,} tokens) from "
        f"{len(m.sources)} sources, {m.totals.quarantined:,} input rows quarantined. "
        f"Tokenizer `{tokenizer.name}` (vocabulary {tokenizer.vocab_size:,}, sha256 "
        f"`{tokenizer.sha256[:12]}`), seed {m.recipe.seed}, packing "
        f"`{m.recipe.packing_algorithm}` with sequence boundaries kept per row "
        "(docs/ROW_SCHEMA.md).",
        "",
        "## Sources and mix",
        "",
        _sources_table(data),
        "",
        *_special_token_text(data),
        _rows_table(data),
        "",
        f"![token share by source]({image_prefix}mix.png)",
        "",
        _kept_table(data),
        "",
        "## Languages",
        "",
        _languages_table(data),
        "",
        _language_balance(data),
        "## Sample lengths",
        "",
        _lengths_table(data),
        "",
        f"![sample lengths by source]({image_prefix}lengths.png)",
        "",
        "## Packing",
        "",
        _splits_table(data),
        "",
        _streams_table(data),
        "",
        f"![row fill and samples per row]({image_prefix}packing.png)",
        "",
        "## Loss weight: token_mean vs sequence_mean",
        "",
        "Under `token_mean` (the trainer's default) every target token weighs the same, "
        "so a sample weighs as much as its answer is long; "
        "under `sequence_mean` (LongAlign's loss weighting) "
        "every sample with a target weighs the same. The table shows each source's share of the "
        "loss weight under both, the plot the share by sample length.",
        "",
        _loss_weight_table(data),
        "",
        f"![loss weight by sample length]({image_prefix}loss_weight.png)",
        "",
        "## Reproduce",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(m.versions.items())) + ".",
        "",
        "<details><summary>Recipe (as validated, defaults filled in)</summary>",
        "",
        "```yaml",
        yaml.safe_dump(m.recipe.document(), sort_keys=True, allow_unicode=True).rstrip(),
        "```",
        "",
        "</details>",
        "",
    ]
    return "\n".join(sections)


def _front_matter(data: CardData) -> str:
    m = data.manifest
    languages = sorted({lang for frame in data.index.values() for lang in frame["lang"].unique()})
    samples = m.totals.samples
    meta = {
        "pretty_name": f"longdata {m.name}",
        "language": languages,
        "license": "other",
        "task_categories": ["text-generation"],
        "tags": ["long-context", "sft", "packed", "longdata"],
        "size_categories": [_size_category(samples)],
        "longdata": {
            "version": m.versions["longdata"],
            "recipe": m.name,
            "tokenizer": m.tokenizer.name,
            "tokenizer_sha256": m.tokenizer.sha256,
            "seed": m.recipe.seed,
            "format": "mosaicml-streaming MDS",
            "splits": {
                name: {
                    "max_seq_len": s.max_seq_len,
                    "rows": s.totals.rows,
                    "tokens": s.totals.tokens,
                }
                for name, s in m.splits.items()
            },
        },
    }
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def _size_category(samples: int) -> str:
    for bound, name in (
        (1_000, "n<1K"),
        (10_000, "1K<n<10K"),
        (100_000, "10K<n<100K"),
        (1_000_000, "100K<n<1M"),
        (10_000_000, "1M<n<10M"),
    ):
        if samples < bound:
            return name
    return "n>10M"


def _table(header: list[str], align: str, rows: list[list[Any]]) -> str:
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|",
    ]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.1%}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _sources_table(data: CardData) -> str:
    total_tokens = sum(s.mix.train_tokens for s in data.manifest.sources) or 1
    rows = []
    for s in data.manifest.sources:
        t, mix = s.tokenize, s.mix
        rows.append(
            [
                s.name,
                s.kind,
                f"{s.weight:g}",
                t.rows_read,
                t.quarantined,
                t.samples,
                t.tokens,
                t.target_tokens,
                mix.duplicates,
                mix.near_duplicates,
                mix.too_short + mix.too_long,
                mix.validation,
                mix.train_samples,
                mix.train_tokens,
                mix.train_tokens / total_tokens,
            ]
        )
    return (
        "`samples`, `tokens` and `target tokens` are after tokenizing (every good row once); "
        "`train samples` and `train tokens` after de-duplication, length filters, the "
        "validation hold-out and the weights; `share of mix` is the share of training tokens; "
        "`duplicates` counts exact and near duplicates, `of which near` those found by "
        "MinHash-LSH (recipe `dedup.near`).\n\n"
        + _table(
            [
                "source",
                "kind",
                "weight",
                "rows read",
                "quarantined",
                "samples",
                "tokens",
                "target tokens",
                "duplicates",
                "of which near",
                "length-filtered",
                "validation",
                "train samples",
                "train tokens",
                "share of mix",
            ],
            "llrrrrrrrrrrrrr",
            rows,
        )
    )


def _special_token_text(data: CardData) -> list[str]:
    """A line per source whose text spells the tokenizer's special tokens (none: no lines)."""
    how = (
        "encoded as control tokens (`tokenizer.special_tokens_in_text: allow`)"
        if data.manifest.recipe.special_tokens_in_text == "allow"
        else "encoded as plain text, never as control tokens"
    )
    counts = [(s.name, s.tokenize.special_token_text_rows) for s in data.manifest.sources]
    return [
        f"Source `{name}`: {count:,} samples spell a special token in their text, {how}.\n"
        for name, count in counts
        if count
    ]


def _rows_table(data: CardData) -> str:
    """Every source row's fate; the last column says whether they add up (longdata verify checks
    it)."""
    rows, files = [], []
    for s in data.manifest.sources:
        accounted = "yes" if not accounting_problems(s) else "NO"
        rows.append(
            [
                s.name,
                s.rows.rows_read,
                s.rows.turn_samples_added,
                *(getattr(s.rows, f) for f in ROW_FATES),
                accounted,
            ]
        )
        for file, counts in s.tokenize.files.items():
            files.append(
                [
                    s.name,
                    file,
                    counts["rows_read"],
                    counts.get("turn_samples_added", 0),
                    counts["quarantined"],
                    counts["samples"],
                ]
            )
    text = (
        "Where every row read went: each is quarantined (`quarantine/<source>.jsonl` says why), "
        "length-filtered, a duplicate, held out for validation or kept for training "
        "(docs/ARCHITECTURE.md, row accounting).\n\n"
        + "`+ per-turn samples`: samples beyond one per row, from conversations made into one "
        "sample per assistant turn (docs/TEMPLATES.md).\n\n"
        + _table(
            [
                "source",
                "rows read",
                "+ per-turn samples",
                "quarantined",
                "too short",
                "too long",
                "duplicates",
                "validation",
                "train",
                "accounted",
            ],
            "lrrrrrrrrl",
            rows,
        )
    )
    if files:
        text += (
            "\n\nPer source file "
            "(`rows read` + `per-turn samples` = `quarantined` + `samples`):\n\n"
            + _table(
                ["source", "file", "rows read", "+ per-turn samples", "quarantined", "samples"],
                "llrrrr",
                files,
            )
        )
    return text


def _kept_table(data: CardData) -> str:
    rows = []
    for split in data.train_splits:
        samples = data.samples[split]
        for r in (
            samples.group_by("source")
            .agg(
                pl.len().alias("samples"),
                (pl.col("status") == "whole").sum().alias("whole"),
                pl.col("status").is_in(["truncated", "split"]).sum().alias("cut"),
                (pl.col("status") == "middle_cut").sum().alias("middle_cut"),
                (pl.col("status") == "dropped").sum().alias("dropped"),
                (pl.col("status") == "no_target_after_cut").sum().alias("no_target"),
                pl.col("target_tokens").sum(),
            )
            .sort("source")
            .iter_rows(named=True)
        ):
            rows.append(
                [
                    split,
                    r["source"],
                    r["samples"],
                    r["whole"],
                    r["cut"],
                    r["middle_cut"],
                    r["dropped"],
                    r["no_target"],
                    r["target_tokens"],
                ]
            )
    return (
        "Per training split: samples packed whole, cut to fit (truncated or split, by the "
        "split's over-length policy), cut in the middle of their longest user turn "
        "(`truncate_middle`: head and tail kept), dropped as too long, or left out because the "
        "cut kept no target token; `target tokens` are those that reached the rows.\n\n"
        + _table(
            [
                "split",
                "source",
                "samples",
                "whole",
                "cut to fit",
                "middle cut",
                "dropped too long",
                "no target after cut",
                "target tokens",
            ],
            "llrrrrrrr",
            rows,
        )
    )


def _languages_table(data: CardData) -> str:
    if not data.train_splits:
        return "No training split."
    samples = data.samples[data.train_splits[0]]
    per_source = samples.group_by("source", "lang").agg(
        pl.len().alias("samples"), pl.col("sample_tokens").sum().alias("tokens")
    )
    overall = (
        per_source.group_by("lang")
        .agg(pl.col("samples", "tokens").sum())
        .with_columns(pl.lit("all sources").alias("source"))
    )
    rows = []
    for frame in (per_source.sort("source", "lang"), overall.sort("lang")):
        for source, lang, count, tokens in frame.select(
            "source", "lang", "samples", "tokens"
        ).iter_rows():
            of_source = (
                samples if source == "all sources" else samples.filter(pl.col("source") == source)
            )
            rows.append(
                [
                    source,
                    lang,
                    count,
                    count / len(of_source),
                    tokens / max(int(of_source["sample_tokens"].sum()), 1),
                ]
            )
    return (
        "Tagged by script (`zh` when at least a quarter of the letters are CJK), "
        "training samples of "
        f"`{data.train_splits[0]}`.\n\n"
        + _table(
            ["source", "language", "samples", "share of samples", "share of tokens"], "llrrr", rows
        )
    )


def _language_balance(data: CardData) -> str:
    """What meeting the recipe's language_share did, or nothing without one."""
    balance = data.manifest.language_balance
    if not balance:
        return ""
    rows = [
        [
            lang,
            balance.share[lang],
            balance.tokens_before[lang],
            balance.tokens_after[lang],
            -balance.discarded[lang] if balance.discarded[lang] else balance.added[lang],
        ]
        for lang in sorted(balance.tokens_before)
    ]
    return (
        f"`language_share` met by `{balance.mode}`: weighted training tokens per language "
        "before and after (change: negative = discarded, positive = repeated).\n\n"
        + _table(
            ["language", "wanted share", "tokens before", "tokens after", "change"], "lrrrr", rows
        )
        + "\n"
    )


def _lengths_table(data: CardData) -> str:
    if not data.train_splits:
        return "No training split."
    samples = data.samples[data.train_splits[0]]
    summary = (
        samples.group_by("source", maintain_order=True)
        .agg(
            pl.len().alias("samples"),
            pl.col("sample_tokens").min().alias("min"),
            pl.col("sample_tokens").quantile(0.5, "nearest").cast(pl.Int64).alias("median"),
            pl.col("sample_tokens").quantile(0.9, "nearest").cast(pl.Int64).alias("p90"),
            pl.col("sample_tokens").max().alias("max"),
        )
        .sort("source")
    )
    return (
        f"Whole samples (before any cut) of `{data.train_splits[0]}`, in tokens, chat template "
        "included; repeats from weights above 1 counted.\n\n"
        + _table(
            ["source", "samples", "min", "median", "p90", "max"],
            "lrrrrr",
            [list(r) for r in summary.iter_rows()],
        )
    )


def _splits_table(data: CardData) -> str:
    rows = []
    for name, split in data.manifest.splits.items():
        cut, packed = split.overlength, split.packing
        per_row = data.rows[name]["samples"]
        rows.append(
            [
                name,
                split.max_seq_len,
                cut.policy,
                split.samples,
                split.totals.rows,
                f"{per_row.mean():.2f}" if len(per_row) else "-",
                packed.fill,
                f"{packed.rows_over_bound:.3f}",
                cut.cut,
                cut.left_out,
            ]
        )
    return _table(
        [
            "split",
            "max_seq_len",
            "over-length",
            "samples",
            "rows",
            "samples/row",
            "fill",
            "rows / lower bound",
            "cut to fit",
            "left out",
        ],
        "lrlrrrrrrr",
        rows,
    )


def _streams_table(data: CardData) -> str:
    rows = [
        [name, s.name, s.rows, s.samples, s.tokens, s.target_tokens, s.proportion]
        for name, split in data.manifest.splits.items()
        for s in split.streams
    ]
    return (
        "Each length bucket is one MDS stream; a trainer mixes a split's streams by `proportion` "
        "(their share of its tokens).\n\n"
        + _table(
            ["split", "stream", "rows", "samples", "tokens", "target tokens", "proportion"],
            "llrrrrr",
            rows,
        )
    )


def _loss_weights(pieces: pl.DataFrame) -> pl.DataFrame:
    """Each packed piece's share of a split's loss under both modes (pieces are what the trainer
    sees as samples)."""
    packed = pieces.filter(pl.col("row") >= 0)
    with_target = (pl.col("target_tokens") > 0).cast(pl.Float64)
    return packed.with_columns(
        (pl.col("target_tokens") / pl.col("target_tokens").sum()).alias("token_mean"),
        (with_target / with_target.sum()).alias("sequence_mean"),
    )


def _loss_weight_table(data: CardData) -> str:
    rows = []
    for split in data.train_splits:
        weights = data.loss_weights[split]
        shares = {
            source: (token, sequence)
            for source, token, sequence in weights.group_by("source")
            .agg(pl.col("token_mean").sum(), pl.col("sequence_mean").sum())
            .iter_rows()
        }
        for source in sorted(data.source_names):
            token, sequence = shares.get(source, (0.0, 0.0))
            rows.append(
                [split, source, token, sequence, f"{token / sequence:.2f}x" if sequence else "-"]
            )
        longest = weights.filter(pl.col("tokens") >= pl.col("tokens").quantile(0.9, "nearest"))
        rows.append(
            [
                split,
                "longest 10% of samples",
                float(longest["token_mean"].sum()),
                float(longest["sequence_mean"].sum()),
                f"{longest['token_mean'].sum() / max(longest['sequence_mean'].sum(), 1e-12):.2f}x",
            ]
        )
    return _table(
        ["split", "source", "token_mean share", "sequence_mean share", "skew"], "llrrr", rows
    )


def _no_labels():
    from matplotlib.ticker import NullFormatter

    return NullFormatter()


def _length_ticks(lengths: np.ndarray) -> list[int]:
    """1x and 1.5x powers of two across the data (8K, 12K, 16K, 24K, ...), thinned to <= 8."""
    if not len(lengths):
        return []
    low, high = max(int(lengths.min()), 1), int(lengths.max())
    ticks = [
        m * 2**k for k in range(int(np.log2(low)) - 1, int(np.log2(high)) + 2) for m in (1, 1.5)
    ]
    ticks = [int(t) for t in ticks if low * 0.9 <= t <= high * 1.1 and t >= 1]
    return ticks[:: -(-len(ticks) // 8)] if ticks else [low, high]


def import_plotting() -> None:
    """Import what the card's plots draw with (~0.4 s of CPU) ahead of ``write_card``: a build
    does it in a thread while its encoder keeps the cores busy, off the build's serial tail."""
    _pyplot()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", metadata={"Software": None})  # no version stamp: rebuilds
    _pyplot().close(fig)  # stay byte-identical
    replace_file(path, image.getvalue())


def _log_bins(values: np.ndarray) -> np.ndarray:
    low, high = max(int(values.min()), 1), int(values.max()) + 1
    decades = max(np.log10(high) - np.log10(low), 0.1)
    return np.geomspace(low, high, max(int(decades * LENGTH_BINS_PER_DECADE), 8) + 1)


def _plot_lengths(data: CardData, path: Path) -> None:
    plt = _pyplot()
    names = data.source_names
    fig, axes = plt.subplots(
        len(names), 1, figsize=(7, 1.2 + 1.6 * len(names)), dpi=100, sharex=True, squeeze=False
    )
    samples = data.samples[data.train_splits[0]] if data.train_splits else None
    lengths = samples["sample_tokens"].to_numpy() if samples is not None else np.array([])
    limits = sorted({s.max_seq_len for s in data.manifest.splits.values()})
    for ax, name in zip(axes[:, 0], names):
        own = (
            samples.filter(pl.col("source") == name)["sample_tokens"].to_numpy()
            if samples is not None
            else []
        )
        if len(own):
            ax.hist(own, bins=_log_bins(lengths))
        for limit in limits:
            ax.axvline(limit, color="0.3", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.set_xticks(_length_ticks(lengths), [_short(t) for t in _length_ticks(lengths)])
        ax.xaxis.set_minor_formatter(_no_labels())
        ax.set_ylabel("samples")
        ax.set_title(f"{name} ({len(own):,} samples)", fontsize=9, loc="left")
    axes[-1, 0].set_xlabel("sample length (tokens, log scale); dashed: max_seq_len of each split")
    fig.suptitle("Training sample lengths by source")
    _save(fig, path)


def _plot_nothing(path: Path, title: str) -> None:
    """The plot of a build with no split (every row quarantined, built with --allow-empty)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 1.6), dpi=100)
    ax.text(0.5, 0.5, "no packed rows in this build", ha="center", va="center")
    ax.set_axis_off()
    fig.suptitle(title)
    _save(fig, path)


def _plot_packing(data: CardData, path: Path) -> None:
    plt = _pyplot()
    splits = data.plotted_splits
    if not splits:
        return _plot_nothing(path, "Packed rows")
    fig, axes = plt.subplots(
        len(splits), 2, figsize=(8, 0.6 + 2.4 * len(splits)), dpi=100, squeeze=False
    )
    for (fill_ax, count_ax), split in zip(axes, splits):
        rows = data.rows[split]
        max_len = data.manifest.split(split).max_seq_len
        fill = rows["tokens"].to_numpy() / max_len
        fill_ax.hist(fill, bins=np.linspace(0, 1, 21))
        fill_ax.set_xlim(0, 1)
        fill_ax.set_xlabel("row fill (tokens / max_seq_len)")
        fill_ax.set_ylabel("rows")
        fill_ax.set_title(
            f"{split}: {len(rows):,} rows, mean fill {fill.mean() if len(fill) else 0:.1%}",
            fontsize=9,
            loc="left",
        )
        per_row = rows["samples"].to_numpy()
        if len(per_row):
            counts = np.bincount(per_row)
            count_ax.bar(np.arange(1, len(counts)), counts[1:], 0.8)
            count_ax.set_xticks(np.arange(1, len(counts)))
        count_ax.set_xlabel("samples per row")
        count_ax.set_ylabel("rows")
        count_ax.set_title(f"max_seq_len {max_len:,}", fontsize=9, loc="left")
    fig.suptitle("Packed rows")
    _save(fig, path)


def _plot_loss_weight(data: CardData, path: Path) -> None:
    plt = _pyplot()
    splits = data.plotted_splits
    if not splits:
        return _plot_nothing(path, "Who the loss listens to: weight by sample length")
    fig, axes = plt.subplots(
        len(splits), 1, figsize=(7, 0.6 + 2.6 * len(splits)), dpi=100, squeeze=False
    )
    for ax, split in zip(axes[:, 0], splits):
        weights = data.loss_weights[split]
        if weights.is_empty():
            continue
        tokens = weights["tokens"].to_numpy()
        # Half-octave bins on a category axis: lengths span decades.
        low, high = np.log2(max(tokens.min(), 1)), np.log2(tokens.max())
        edges = np.round(2 ** (np.arange(np.floor(2 * low), np.floor(2 * high) + 2) / 2)).astype(
            np.int64
        )
        which = np.clip(np.searchsorted(edges, tokens, side="right") - 1, 0, len(edges) - 2)
        x = np.arange(len(edges) - 1)
        for offset, mode in ((-0.2, "token_mean"), (0.2, "sequence_mean")):
            share = np.bincount(which, weights=weights[mode].to_numpy(), minlength=len(x))
            ax.bar(x + offset, share, 0.4, label=mode)
        ax.set_xticks(
            x, [f"{_short(a)}-{_short(b)}" for a, b in zip(edges[:-1], edges[1:])], fontsize=8
        )
        ax.set_ylabel("share of loss weight")
        ax.set_xlabel("sample length in the row (tokens, half-octave bins)")
        ax.set_title(split, fontsize=9, loc="left")
        ax.legend(fontsize=8)
    fig.suptitle("Who the loss listens to: weight by sample length")
    _save(fig, path)


def _short(tokens: float) -> str:
    return f"{tokens / 1024:.3g}K" if tokens >= 1024 else f"{tokens:.0f}"


def _plot_mix(data: CardData, path: Path) -> None:
    plt = _pyplot()
    sources = data.manifest.sources
    names = [s.name for s in sources]
    before = np.array([s.tokenize.tokens for s in sources], dtype=float)
    after = np.array([s.mix.train_tokens for s in sources], dtype=float)
    fig, ax = plt.subplots(figsize=(7, 3), dpi=100)
    x = np.arange(len(names))
    ax.bar(x - 0.2, before / max(before.sum(), 1), 0.4, label="tokenized")
    ax.bar(x + 0.2, after / max(after.sum(), 1), 0.4, label="training mix (after weights)")
    ax.set_xticks(x, names)
    ax.set_ylabel("share of tokens")
    ax.set_title("Token share by source")
    ax.legend(fontsize=8)
    _save(fig, path)
