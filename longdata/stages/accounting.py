"""Where every source row went: the counts identity a build records and ``verify`` checks.

For each source, every row the reader produced (``rows_read``: decoded or not, up to the source's
``max_samples``) has exactly one fate, so

    rows_read + turn_samples_added == quarantined + too_short + too_long + duplicates + validation
    + train

where ``turn_samples_added`` are the samples beyond one per row that conversations made into one
sample per assistant turn contributed (``tokenize.turn_samples - tokenize.split_conversations``;
docs/TEMPLATES.md): from tokenization on, each such sample has a fate of its own.

``quarantined`` rows failed to decode, normalise, render, tokenize or mask (each is a line of
``quarantine/<source>.jsonl``); ``too_short``/``too_long`` failed the source's token-length
filter; ``duplicates`` repeated an earlier sample's text; the rest are the distinct samples held
out for validation or kept for training. Later steps act on these samples, not on rows, and are
counted where they happen: weights repeat training samples, a language share trims repeats
(``mix.language_trimmed``), and packing cuts or drops samples per split (``overlength``).

For each source file the same holds one step earlier:
``rows_read + turn_samples_added == samples + quarantined``.
"""

from __future__ import annotations

from dataclasses import asdict

from longdata.format import SourceEntry
from longdata.format.manifest import MixCounts, RowAccounting, TokenizeCounts

ROW_FATES = ("quarantined", "too_short", "too_long", "duplicates", "validation", "train")


def row_accounting(tokenize: TokenizeCounts, mix: MixCounts) -> RowAccounting:
    """The ``rows`` entry of a source in manifest.json, from its tokenize and mix stats."""
    return RowAccounting(
        rows_read=tokenize.rows_read,
        turn_samples_added=tokenize.turn_samples - tokenize.split_conversations,
        quarantined=tokenize.quarantined,
        too_short=mix.too_short,
        too_long=mix.too_long,
        duplicates=mix.duplicates,
        validation=mix.validation,
        train=mix.train_unique,
    )


def accounting_problems(source: SourceEntry) -> list[str]:
    """Every way one manifest source entry fails to account for its rows (empty when it does)."""
    name, rows = source.name, source.rows
    if rows is None:
        return [f"source {name}: the manifest records no row accounting"]
    if source.tokenize is None or source.mix is None:
        return [f"source {name}: the manifest records no tokenize and mix stats"]
    problems = []
    fates = sum(getattr(rows, fate) for fate in ROW_FATES)
    units = rows.rows_read + rows.turn_samples_added
    if units != fates:
        problems.append(
            f"source {name}: {rows.rows_read} rows read (+{rows.turn_samples_added} "
            "per-turn samples) but "
            + " + ".join(f"{getattr(rows, f)} {f}" for f in ROW_FATES)
            + f" = {fates}"
        )
    recorded = row_accounting(source.tokenize, source.mix)
    if recorded != rows:
        problems.append(
            f"source {name}: row accounting {asdict(rows)} disagrees with its tokenize and mix "
            f"stats {asdict(recorded)}"
        )
    files = source.tokenize.files
    for file, counts in files.items():
        added = counts.get("turn_samples_added", 0)
        if counts["rows_read"] + added != counts["samples"] + counts["quarantined"]:
            problems.append(
                f"source {name} file {file}: {counts['rows_read']} rows read (+{added} "
                f"per-turn samples) but {counts['samples']} samples "
                f"+ {counts['quarantined']} quarantined"
            )
    if files:
        for what in ("rows_read", "samples", "quarantined"):
            total = sum(counts[what] for counts in files.values())
            if total != getattr(source.tokenize, what):
                problems.append(
                    f"source {name}: its files add up to {total} {what}, "
                    f"the source to {getattr(source.tokenize, what)}"
                )
    return problems
