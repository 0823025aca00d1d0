"""Data card: what went into a build, in Markdown with plots, written from the manifest."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from longdata.mix import Mix


def write_card(manifest: dict[str, Any], mixed: Mix, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [s["name"] for s in manifest["sources"]]
    lengths = _length_table(names, mixed)
    _plot_lengths(lengths, names, out_dir / "lengths.png")
    _plot_mix(manifest, out_dir / "mix.png")
    text = "\n".join([
        f"# Data card: {manifest['name']}",
        "",
        f"Tokenizer `{manifest['tokenizer']['name']}` (vocab {manifest['tokenizer']['vocab_size']:,}, "
        f"sha256 `{manifest['tokenizer']['sha256'][:12]}`), seed {manifest['recipe']['seed']}, "
        f"packing `{manifest['recipe']['packing']['algorithm']}`, over-length policy "
        f"`{manifest['recipe']['packing']['overlength']}` (stages may override it).",
        "",
        "## Sources",
        "",
        _sources_table(manifest),
        "",
        "## Sample lengths (train, after mixing)",
        "",
        _length_summary(lengths),
        "",
        "![sample lengths by source](lengths.png)",
        "",
        "![token share by source](mix.png)",
        "",
        "## Splits and streams",
        "",
        _splits_table(manifest),
        "",
        "Rows follow the schema in docs/ROW_SCHEMA.md; each stream is a mosaicml-streaming MDS "
        "directory. `proportion` is the stream's share of its split's tokens.",
        "",
    ])
    (out_dir / "README.md").write_text(text, encoding="utf-8")
    return out_dir / "README.md"


def _length_table(names: Sequence[str], mixed: Mix) -> pl.DataFrame:
    return pl.DataFrame({
        "source": np.asarray(names, dtype=object)[mixed.train.source] if len(mixed.train) else [],
        "tokens": mixed.train.length,
    }, schema={"source": pl.Utf8, "tokens": pl.Int64})


def _sources_table(manifest: dict[str, Any]) -> str:
    lines = ["| source | kind | weight | rows read | quarantined | samples | duplicates | "
             "validation | train samples (weighted) | train tokens |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in manifest["sources"]:
        t, m = s["tokenize"], s["mix"]
        lines.append(f"| {s['name']} | {s['kind']} | {s['weight']:g} | {t['rows_read']:,} | "
                     f"{t['quarantined']:,} | {t['samples']:,} | {m['duplicates']:,} | "
                     f"{m['validation']:,} | {m['train_samples']:,} | {m['train_tokens']:,} |")
    return "\n".join(lines)


def _length_summary(lengths: pl.DataFrame) -> str:
    if lengths.is_empty():
        return "No training samples."
    summary = (lengths.group_by("source", maintain_order=True)
               .agg(pl.len().alias("samples"), pl.col("tokens").min().alias("min"),
                    pl.col("tokens").median().alias("median"), pl.col("tokens").max().alias("max"),
                    pl.col("tokens").sum().alias("tokens")))
    lines = ["| source | samples | min | median | max | tokens |", "|---|---:|---:|---:|---:|---:|"]
    for row in summary.iter_rows(named=True):
        lines.append(f"| {row['source']} | {row['samples']:,} | {row['min']:,} | {row['median']:,.0f} | "
                     f"{row['max']:,} | {row['tokens']:,} |")
    return "\n".join(lines)


def _splits_table(manifest: dict[str, Any]) -> str:
    lines = ["| split | max_seq_len | over-length policy | samples | rows | fill | rows/bound | "
             "truncated | dropped | split | no target after cut |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, split in manifest["splits"].items():
        cut, packed = split["overlength"], split["packing"]
        lines.append(f"| {name} | {split['max_seq_len']:,} | {cut['policy']} | {split['samples']:,} | "
                     f"{split['rows']:,} | {packed['fill']:.2%} | {packed['rows_over_bound']:.3f} | "
                     f"{cut['truncated']:,} | {cut['dropped']:,} | {cut['split']:,} | "
                     f"{cut['no_target_after_cut']:,} |")
    lines += ["", "| split | stream | rows | tokens | target tokens | proportion |",
              "|---|---|---:|---:|---:|---:|"]
    for name, split in manifest["splits"].items():
        for stream in split["streams"]:
            lines.append(f"| {name} | {stream['name']} | {stream['rows']:,} | {stream['tokens']:,} | "
                         f"{stream['target_tokens']:,} | {stream['proportion']:.3f} |")
    return "\n".join(lines)


def _plot_lengths(lengths: pl.DataFrame, names: Sequence[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    values = lengths["tokens"].to_numpy()
    if len(values):
        bins = np.geomspace(max(values.min(), 1), values.max() + 1, 40)
        stacks = [lengths.filter(pl.col("source") == n)["tokens"].to_numpy() for n in names]
        ax.hist(stacks, bins=bins, stacked=True, label=list(names))
        ax.set_xscale("log")
        ax.legend(fontsize=8)
    ax.set_xlabel("sample length (tokens)")
    ax.set_ylabel("samples")
    ax.set_title("Train sample lengths by source")
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def _plot_mix(manifest: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s["name"] for s in manifest["sources"]]
    before = np.array([s["tokenize"]["tokens"] for s in manifest["sources"]], dtype=float)
    after = np.array([s["mix"]["train_tokens"] for s in manifest["sources"]], dtype=float)
    fig, ax = plt.subplots(figsize=(7, 3), dpi=100)
    x = np.arange(len(names))
    ax.bar(x - 0.2, before / max(before.sum(), 1), 0.4, label="tokenized")
    ax.bar(x + 0.2, after / max(after.sum(), 1), 0.4, label="train mix (weighted)")
    ax.set_xticks(x, names)
    ax.set_ylabel("share of tokens")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
