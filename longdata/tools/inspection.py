"""``longdata inspect``: one packed row in the terminal, as the trainer will see it.

Each sample of the row gets a title (slot, sample id, source, length, target tokens, status) and
its text, detokenized run by run: a *run* is a stretch of tokens with the same loss-mask value,
decoded as a unit (so characters whose bytes straddle tokens survive). Target (loss) runs are
highlighted, the rest dimmed, special tokens marked. Long non-target runs keep ``context`` tokens
at each end and elide the middle with a count; target runs are never elided unless one is longer
than twice ``target_context(context)`` (10x the context, at least 1,000 tokens). Without colour
(``--plain``, a pipe, or
NO_COLOR) targets are wrapped in ``⟦…⟧`` instead, so the mask reads in plain text too.

The rows do not store sample ids; the split's sample index (``samples.parquet``) does, joined on
(stream, row, slot). Only the shard holding the row is opened (``longdata.format.mds``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from longdata.format import (
    Manifest,
    NotABuildError,
    SplitEntry,
    StreamEntry,
    StreamReader,
    TokenizerEntry,
    tokenizer_location,
)
from longdata.format.remote_code import refuse_remote_code
from longdata.stages.sample_index import INDEX_FILE, read_sample_index

DEFAULT_CONTEXT = 100
# A target run is elided only when huge: it keeps this many tokens at each end (at least 1,000).
TARGET_CONTEXT_FACTOR, TARGET_CONTEXT_MIN = 10, 1000
MIN_ELIDED = 16  # a gap shorter than this is shown: the marker would hide almost nothing
TARGET_OPEN, TARGET_CLOSE = "⟦", "⟧"
MAX_PLACEMENTS = 8  # other rows of a --sample-id listed in the header (all of them in --json)

STYLES = {
    "inspect.target": "bold bright_white on dark_green",
    "inspect.target.special": "bold bright_magenta on dark_green",
    "inspect.context": "dim",
    "inspect.context.special": "magenta",
    "inspect.elided": "italic yellow",
    "inspect.title": "bold cyan",
    "inspect.focus": "bold yellow",
}


class InspectError(ValueError):
    """A bad build directory, split, stream, row or sample id: one line for the user (exit 2)."""


class NotPacked(Exception):  # noqa: N818 - an outcome, not a failure of the program
    """The sample asked for is in no row of the split(s) searched; ``report`` says why."""

    def __init__(self, report: dict[str, Any]):
        super().__init__(report["message"])
        self.report = report


@dataclass
class Segment:
    """``tokens`` consecutive tokens with the same mask value, shown as ``parts`` ((text,
    is_special) pairs), or elided (``parts`` is None)."""

    tokens: int
    target: bool = False
    parts: list[tuple[str, bool]] | None = None

    @property
    def elided(self) -> bool:
        return self.parts is None

    @property
    def text(self) -> str:
        return "".join(text for text, _ in self.parts or ())

    def as_dict(self) -> dict[str, Any]:
        if self.elided:
            return {"elided": self.tokens, "target": self.target}
        return {"target": self.target, "text": self.text, "tokens": self.tokens}


@dataclass
class SampleView:
    slot: int
    offset: int  # the sample's first token inside the row
    tokens: int
    target_tokens: int
    source: str
    sample_id: str | None = None
    status: str | None = None
    lang: str | None = None
    start: int | None = None  # the piece's first token inside its whole sample
    sample_tokens: int | None = None
    gap_start: int = 0  # a middle cut leaves out gap_tokens tokens of the sample from here
    gap_tokens: int = 0
    segments: list[Segment] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k != "segments"}
        data["segments"] = [s.as_dict() for s in self.segments]
        return data


@dataclass
class RowView:
    build_dir: str
    name: str
    split: str
    stream: str
    row: int
    stream_rows: int
    shard: str
    max_seq_len: int
    tokens: int
    target_tokens: int
    tokenizer: str
    samples: list[SampleView]
    focus: dict[str, Any] | None = None  # --sample-id: the id, its slot, its other placements
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k != "samples"}
        data["samples"] = [s.as_dict() for s in self.samples]
        return data


# --- locating the row ---------------------------------------------------------------------------


def load_manifest(build_dir: Path) -> Manifest:
    """The build's manifest as checked by ``longdata.format.Manifest``, splits in stage order."""
    try:
        return Manifest.read(build_dir)
    except NotABuildError as exc:
        raise InspectError(str(exc)) from None


def choose_split(manifest: Manifest, split: str | None) -> str:
    splits = manifest.split_names
    if split is None:
        trains = manifest.training_splits()
        if not (trains or splits):
            raise InspectError("the build has no splits")
        return (trains or splits)[0]
    if split not in manifest.splits:
        raise InspectError(f"no split {split!r} in this build; splits: {', '.join(splits)}")
    return split


def choose_stream(manifest: Manifest, split: str, stream: str | None) -> StreamEntry:
    streams = manifest.split(split).streams
    if stream is None:
        with_rows = [s for s in streams if s.rows > 0]
        if not with_rows:
            raise InspectError(f"split {split} has no rows")
        return with_rows[0]
    for candidate in streams:
        if candidate.name == stream:
            return candidate
    names = ", ".join(f"{s.name} ({_rows(s.rows)})" for s in streams)
    raise InspectError(f"no stream {stream!r} in split {split}; streams: {names}")


def _rows(n: int) -> str:
    return f"{n:,} row{'' if n == 1 else 's'}"


def _check_stream_name(manifest: Manifest, split: str | None, stream: str) -> None:
    if split is not None:
        choose_stream(manifest, split, stream)
        return
    names = sorted({s.name for sp in manifest.splits.values() for s in sp.streams})
    if stream not in names:
        raise InspectError(f"no stream {stream!r} in any split; streams: {', '.join(names)}")


def _index(build_dir: Path, split: str):
    import polars as pl

    path = Path(build_dir) / split / INDEX_FILE
    return pl.from_arrow(read_sample_index(build_dir, split)).lazy() if path.exists() else None


def _not_packed_reason(line: dict, split: SplitEntry) -> str:
    status, n, max_len = line["status"], line["sample_tokens"], split.max_seq_len
    if status == "dropped":
        return (
            f"dropped: {n:,} tokens, longer than max_seq_len {max_len:,}, and the split's "
            f"over-length policy is drop"
        )
    if status == "empty":
        return "empty: the sample has no tokens"
    if status == "no_target_after_cut":
        return (
            f"no_target_after_cut: {n:,} tokens, cut to max_seq_len {max_len:,}, and no "
            f"target (loss) token was left in what would be kept"
        )
    return status


def find_sample(
    build_dir: Path, manifest: Manifest, sample_id: str, split: str | None, stream: str | None
) -> tuple[str, dict, list[dict]]:
    """(split, the first placement, every placement in that split) of ``sample_id``: its first
    packed piece in ``split`` (or, with no split given, in the first split that packs it, in
    stage order), optionally only in ``stream``. Raises NotPacked with the reason when
    it is in the split(s) but in no row, InspectError when the id is unknown."""
    import polars as pl

    searched = [split] if split is not None else manifest.split_names
    seen: dict[str, pl.DataFrame] = {}
    for name in searched:
        index = _index(build_dir, name)
        if index is None:
            raise InspectError(
                f"{Path(build_dir) / name / INDEX_FILE}: missing (built before the "
                f"sample index existed?), so --sample-id cannot be looked up"
            )
        lines = index.filter(pl.col("sample_id") == sample_id).collect()
        if lines.height:
            seen[name] = lines
    for name, lines in seen.items():
        packed = lines.filter(pl.col("row") >= 0)
        if stream is not None:
            packed = packed.filter(pl.col("stream") == stream)
        if packed.height:
            order = {s.name: i for i, s in enumerate(manifest.split(name).streams)}
            placements = sorted(
                packed.iter_rows(named=True),
                key=lambda p: (order.get(p["stream"], len(order)), p["row"], p["slot"]),
            )
            return name, placements[0], placements
    if not seen:
        raise InspectError(_unknown_id_hint(build_dir, manifest, sample_id, searched))
    elsewhere = _placements_elsewhere(build_dir, manifest, sample_id, set(seen))
    why = []
    for name, lines in seen.items():
        packed = lines.filter(pl.col("row") >= 0)
        if packed.height:  # only possible when --stream excluded it
            streams = sorted(set(packed["stream"]))
            why.append(
                f"in split {name} it is packed only in stream(s) {', '.join(streams)}, not {stream}"
            )
        else:
            line = lines.row(0, named=True)
            why.append(f"in split {name}: {_not_packed_reason(line, manifest.split(name))}")
    message = f"sample {sample_id} is in no row: " + "; ".join(why)
    if elsewhere:
        message += f"; it is packed in {elsewhere}"
    report = {
        "sample_id": sample_id,
        "packed": False,
        "message": message,
        "splits": {
            name: lines.select("status", "sample_tokens", "stream", "row", "slot").to_dicts()
            for name, lines in seen.items()
        },
    }
    raise NotPacked(report)


def _placements_elsewhere(
    build_dir: Path, manifest: Manifest, sample_id: str, skip: set[str]
) -> str:
    import polars as pl

    for name in manifest.split_names:
        index = _index(build_dir, name)
        if name in skip or index is None:
            continue
        packed = index.filter((pl.col("sample_id") == sample_id) & (pl.col("row") >= 0)).collect()
        if packed.height:
            first = packed.sort("stream", "row", "slot").row(0, named=True)
            return (
                f"split {name} (--split {name} --stream {first['stream']} --row {first['row']}, "
                f"slot {first['slot']})"
            )
    return ""


def _unknown_id_hint(
    build_dir: Path, manifest: Manifest, sample_id: str, searched: list[str]
) -> str:
    import polars as pl

    where = f"split {searched[0]}" if len(searched) == 1 else "any split"
    message = f"unknown sample id {sample_id!r} in {where}"
    elsewhere = _placements_elsewhere(build_dir, manifest, sample_id, set(searched))
    if elsewhere:
        return f"{message}; it is packed in {elsewhere}"
    index = pl.concat(
        [_index(build_dir, name).select("source", "position", "sample_id") for name in searched]
    )
    ranges = (
        index.group_by("source")
        .agg(
            pl.col("position").min().alias("lo"),
            pl.col("position").max().alias("hi"),
            pl.col("sample_id").first().alias("example"),
        )
        .sort("source")
        .collect()
    )
    source = sample_id.rsplit(":", 1)[0]
    known = {r["source"]: r for r in ranges.iter_rows(named=True)}
    if source in known:
        r = known[source]
        scope = f"split {searched[0]}" if len(searched) == 1 else "this build"
        return (
            f"{message}; ids are <source>:<position>, and source {source} has positions "
            f"{r['lo']}..{r['hi']} in {scope} (not every one: a sample may be in another "
            f"split, deduplicated or filtered out)"
        )
    examples = ", ".join(
        f"{r['example']} ({r['source']} {r['lo']}..{r['hi']})" for r in known.values()
    )
    return f"{message}; ids are <source>:<position>, e.g. {examples}"


# --- detokenizing -------------------------------------------------------------------------------


class Detokenizer:
    """The build's tokenizer, for decoding only: ``tokenizers`` straight from tokenizer.json
    when there is one (fast to load), else ``transformers.AutoTokenizer``."""

    def __init__(self, info: TokenizerEntry):
        path = tokenizer_location(info)
        self.name = info.name
        json_file = Path(path) / "tokenizer.json"
        try:
            if json_file.is_file():
                from tokenizers import Tokenizer

                self._tokenizer = Tokenizer.from_file(str(json_file))
            else:
                from transformers import AutoTokenizer

                refuse_remote_code(path)
                self._tokenizer = AutoTokenizer.from_pretrained(
                    path, use_fast=True, trust_remote_code=False
                ).backend_tokenizer
        except Exception as exc:  # noqa: BLE001 - any loading failure is reported the same way
            raise InspectError(f"cannot load the build's tokenizer {path}: {exc}") from None
        self.special = frozenset(
            i for i, token in self._tokenizer.get_added_tokens_decoder().items() if token.special
        )

    def decode(self, ids: np.ndarray) -> str:
        return self._tokenizer.decode(ids.tolist(), skip_special_tokens=False)

    def parts(self, ids: np.ndarray) -> list[tuple[str, bool]]:
        """(text, is_special) for each stretch of ordinary tokens and each special token."""
        if not len(ids):
            return []
        special = np.isin(ids, list(self.special)) if self.special else np.zeros(len(ids), bool)
        cuts = np.flatnonzero(special[1:] != special[:-1]) + 1
        bounds = [0, *cuts.tolist(), len(ids)]
        out = []
        for begin, end in zip(bounds[:-1], bounds[1:]):
            if special[begin]:
                out.extend((self.decode(ids[i : i + 1]), True) for i in range(begin, end))
            else:
                out.append((self.decode(ids[begin:end]), False))
        return out


def target_context(context: int) -> int:
    return max(TARGET_CONTEXT_MIN, TARGET_CONTEXT_FACTOR * context)


def segments(
    ids: np.ndarray,
    mask: np.ndarray,
    detok: Detokenizer,
    context: int = DEFAULT_CONTEXT,
    full: bool = False,
) -> list[Segment]:
    """The sample's runs of equal mask value, each decoded as a unit; with ``full`` False, a
    non-target run longer than ``2 * context`` keeps ``context`` tokens at each end (a few more
    where a character's bytes straddle the cut) and elides the middle (a target run:
    ``target_context(context)``), unless that would hide fewer than ``MIN_ELIDED`` tokens."""
    out: list[Segment] = []
    if not len(ids):
        return out
    cuts = np.flatnonzero(mask[1:] != mask[:-1]) + 1
    bounds = [0, *cuts.tolist(), len(ids)]
    for begin, end in zip(bounds[:-1], bounds[1:]):
        target = bool(mask[begin])
        keep = target_context(context) if target else max(context, 0)
        head, tail = begin + keep, end - keep
        if keep and tail - head >= MIN_ELIDED:
            head, tail = _whole_characters(ids, begin, head, tail, end, detok)
        if full or tail - head < MIN_ELIDED:
            out.append(Segment(end - begin, target, detok.parts(ids[begin:end])))
            continue
        if head > begin:
            out.append(Segment(head - begin, target, detok.parts(ids[begin:head])))
        out.append(Segment(tail - head, target))
        if tail < end:
            out.append(Segment(end - tail, target, detok.parts(ids[tail:end])))
    return out


def _whole_characters(
    ids: np.ndarray, begin: int, head: int, tail: int, end: int, detok: Detokenizer
) -> tuple[int, int]:
    """Move the elision's edges by up to 3 tokens so that neither shown end cuts a character
    whose UTF-8 bytes are spread over several byte-level tokens (it would show as U+FFFD)."""
    for _ in range(3):
        if head < tail and detok.decode(ids[begin:head]).endswith("\ufffd"):
            head += 1
    for _ in range(3):
        if tail > head and detok.decode(ids[tail:end]).startswith("\ufffd"):
            tail -= 1
    return head, tail


# --- the view -----------------------------------------------------------------------------------


def inspect_row(
    build_dir: str | Path,
    *,
    split: str | None = None,
    stream: str | None = None,
    row: int | None = None,
    sample_id: str | None = None,
    context: int = DEFAULT_CONTEXT,
    full: bool = False,
    detok: Detokenizer | None = None,
) -> RowView:
    """Everything ``longdata inspect`` shows about one row. Raises InspectError for a bad
    argument and NotPacked when ``sample_id`` is in no row."""
    import polars as pl

    build_dir = Path(build_dir)
    manifest = load_manifest(build_dir)
    if row is not None and sample_id is not None:
        raise InspectError("give --row or --sample-id, not both")
    if context < 0:
        raise InspectError(f"--context must be >= 0, got {context}")
    if split is not None:
        choose_split(manifest, split)  # a clear error for a bad --split before anything else
    focus = None
    if sample_id is not None:
        if stream is not None:
            _check_stream_name(manifest, split, stream)
        split, placement, placements = find_sample(build_dir, manifest, sample_id, split, stream)
        stream, row = placement["stream"], placement["row"]
        focus = {
            "sample_id": sample_id,
            "slot": placement["slot"],
            "placements": [
                {
                    k: p[k]
                    for k in (
                        "stream",
                        "row",
                        "slot",
                        "start",
                        "tokens",
                        "gap_start",
                        "gap_tokens",
                        "status",
                    )
                    if k in p
                }
                for p in placements
            ],
        }
    split = choose_split(manifest, split)
    stream_info = choose_stream(manifest, split, stream)
    row = 0 if row is None else row
    reader = StreamReader(manifest.stream_dir(stream_info))
    if not 0 <= row < reader.rows:
        raise InspectError(
            f"--row {row} out of range: stream {stream_info.name} of split {split} "
            f"has {_rows(reader.rows)} (0..{reader.rows - 1})"
        )
    data = reader.row(row)
    ids, mask = data["input_ids"], data["loss_mask"]
    seq_lens, source_ids = data["seq_lens"].tolist(), data["source_ids"].tolist()
    detok = detok or Detokenizer(manifest.tokenizer)
    names = manifest.source_names

    notes: list[str] = []
    index = _index(build_dir, split)
    indexed: list[dict] = []
    if index is None:
        notes.append(f"no {split}/{INDEX_FILE}: sample ids unknown (built before the sample index)")
    else:
        indexed = (
            index.filter((pl.col("stream") == stream_info.name) & (pl.col("row") == row))
            .sort("slot")
            .collect()
            .to_dicts()
        )
        if [line["tokens"] for line in indexed] != seq_lens:
            notes.append(
                f"the sample index lists pieces {[line['tokens'] for line in indexed]} "
                f"for this row, the row holds {seq_lens}: run `longdata verify`"
            )
            indexed = []

    samples, offset = [], 0
    for slot, (length, source_id) in enumerate(zip(seq_lens, source_ids)):
        span_ids, span_mask = ids[offset : offset + length], mask[offset : offset + length]
        view = SampleView(
            slot=slot,
            offset=offset,
            tokens=length,
            target_tokens=int(span_mask.sum()),
            source=names[source_id] if source_id < len(names) else f"#{source_id}",
            segments=segments(span_ids, span_mask, detok, context, full),
        )
        if indexed:
            line = indexed[slot]
            view.sample_id, view.status, view.lang = line["sample_id"], line["status"], line["lang"]
            view.start, view.sample_tokens = line["start"], line["sample_tokens"]
            view.gap_start, view.gap_tokens = line.get("gap_start", 0), line.get("gap_tokens", 0)
        samples.append(view)
        offset += length
    return RowView(
        build_dir=str(build_dir),
        name=manifest.name,
        split=split,
        stream=stream_info.name,
        row=row,
        stream_rows=reader.rows,
        shard=str(reader.shard_path(row).relative_to(reader.stream_dir)),
        max_seq_len=manifest.split(split).max_seq_len,
        tokens=len(ids),
        target_tokens=int(mask.sum()),
        tokenizer=detok.name,
        samples=samples,
        focus=focus,
        notes=notes,
    )


# --- rendering ----------------------------------------------------------------------------------


def theme():
    from rich.theme import Theme

    return Theme(STYLES)


def use_plain(console) -> bool:
    """Colour is off (a pipe, NO_COLOR, TERM=dumb): mark targets with brackets instead."""
    return console.color_system is None or console.no_color


def sample_title(view: RowView, sample: SampleView) -> str:
    focused = view.focus is not None and view.focus["slot"] == sample.slot
    parts = [
        f"{'▶ ' if focused else ''}slot {sample.slot}",
        sample.sample_id or "?",
        sample.source,
        f"{sample.tokens:,} tokens",
        f"{sample.target_tokens:,} target",
    ]
    if sample.status and sample.status != "whole":
        span = _token_span(sample.start, sample.tokens, sample.gap_start, sample.gap_tokens)
        parts.append(f"{sample.status} (tokens {span} of {sample.sample_tokens:,})")
    elif sample.status:
        parts.append(sample.status)
    return " · ".join(parts)


def sample_text(sample: SampleView, plain: bool):
    """The sample's text as a rich ``Text``: target runs styled ``inspect.target`` (and wrapped
    in ⟦…⟧ when ``plain``), the rest ``inspect.context``; special tokens in either get the
    ``.special`` variant of the style."""
    from rich.text import Text

    text = Text()
    for segment in sample.segments:
        if segment.elided:
            kind = "target tokens" if segment.target else "tokens"
            before = "" if not text.plain or text.plain.endswith("\n") else "\n"
            text.append(f"{before}… {segment.tokens:,} {kind} …\n", style="inspect.elided")
            continue
        base = "inspect.target" if segment.target else "inspect.context"
        if plain and segment.target:
            text.append(TARGET_OPEN, style="inspect.elided")
        for part, special in segment.parts:
            text.append(part, style=f"{base}.special" if special else base)
        if plain and segment.target:
            text.append(TARGET_CLOSE, style="inspect.elided")
    return text


def _piece(placement: dict) -> str:
    if placement["status"] == "whole":
        return ""
    span = _token_span(
        placement["start"],
        placement["tokens"],
        placement.get("gap_start", 0),
        placement.get("gap_tokens", 0),
    )
    return f" (tokens {span})"


def _token_span(start: int, tokens: int, gap_start: int, gap_tokens: int) -> str:
    """``0..4,096``, or ``0..1,200 + 9,000..11,896`` for a piece with its middle cut out."""
    if not gap_tokens:
        return f"{start:,}..{start + tokens:,}"
    return f"{start:,}..{gap_start:,} + {gap_start + gap_tokens:,}..{start + tokens + gap_tokens:,}"


def header(view: RowView, plain: bool):
    from rich.panel import Panel
    from rich.text import Text

    fill = view.tokens / view.max_seq_len if view.max_seq_len else 0
    lines = [
        f"build   {view.build_dir}" + (f" ({view.name})" if view.name else ""),
        f"row     {view.split} · {view.stream} · "
        f"row {view.row:,} of {_rows(view.stream_rows)} · {view.shard}",
        f"tokens  {view.tokens:,} / {view.max_seq_len:,} ({fill:.1%} full) · "
        f"{view.target_tokens:,} "
        f"target · {len(view.samples)} sample{'s' if len(view.samples) != 1 else ''}",
    ]
    if view.focus:
        first, *others = view.focus["placements"]
        line = f"sample  {view.focus['sample_id']} is slot {first['slot']}{_piece(first)}"
        if others:
            shown = ", ".join(
                f"{p['stream']} row {p['row']:,} slot {p['slot']}{_piece(p)}"
                for p in others[:MAX_PLACEMENTS]
            )
            more = len(others) - MAX_PLACEMENTS
            line += f"; also in {shown}" + (f" and {more:,} more" if more > 0 else "")
        lines.append(line)
    legend = (
        f"{TARGET_OPEN}target{TARGET_CLOSE} = loss tokens, the rest is context"
        if plain
        else "[inspect.target]target[/] = loss tokens, [inspect.context]context[/] "
        "dimmed, [inspect.context.special]special tokens[/]"
    )
    body = Text("\n".join(lines))
    body.append("\n")
    body.append(Text.from_markup(legend))
    for note in view.notes:
        body.append(f"\nnote: {note}", style="inspect.focus")
    return Panel(
        body,
        title=f"longdata inspect · tokenizer {view.tokenizer}",
        title_align="left",
        expand=False,
    )


def renderables(view: RowView, plain: bool) -> list:
    from rich.rule import Rule
    from rich.text import Text

    out: list = [header(view, plain)]
    for sample in view.samples:
        focused = view.focus is not None and view.focus["slot"] == sample.slot
        out.append(
            Rule(
                Text(
                    sample_title(view, sample),
                    style="inspect.focus" if focused else "inspect.title",
                ),
                align="left",
            )
        )
        out.append(sample_text(sample, plain))
    return out


def render(view: RowView, console, plain: bool | None = None) -> None:
    plain = use_plain(console) if plain is None else plain
    with console.use_theme(theme()):
        for item in renderables(view, plain):
            console.print(item)


def render_not_packed(report: dict, console) -> None:
    console.print(report["message"], highlight=False, soft_wrap=True, markup=False)
