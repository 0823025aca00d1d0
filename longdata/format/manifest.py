"""``manifest.json``: the typed, versioned description of a finished build.

A build directory is complete exactly when it holds a ``manifest.json`` (written last). This
module is the one place it is parsed and written: ``Manifest.read`` checks the format version,
every field into typed entries (sources with their counts, splits, streams, the tokenizer with
its bound chat template, the recipe fields readers use) and that every stream path stays inside
the build directory; anything else is ``BuildFormatError`` with one line naming the key path.
The builder constructs the same entries and ``write_manifest`` serialises them, after the same
checks, so a build cannot publish a manifest its readers would refuse. Entries that manifests of
older or hand-made builds lack read as ``None`` (or their counts as 0).

Split names (``train``, ``validation``, ``<stage>/train``, ...) are composed and taken apart only
by ``split_name`` and ``parse_split_name``.

Splits are kept in *stage order* (curriculum order: stages as the recipe lists them, each stage's
train split before its validation split). New manifests record it as ``split_order``; for
manifests written before that key existed the order is recovered from the recipe's stages.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from longdata.format.paths import UnsafePathError, inside

FORMAT = "longdata/1"
# Formats this reader understands. "longdata/1" manifests without `split_order` (older builds)
# read the same; a change readers cannot ignore gets a new version here.
SUPPORTED_FORMATS = (FORMAT,)
MANIFEST_FILE = "manifest.json"


class BuildFormatError(ValueError):
    """A build directory whose manifest (or shards) cannot be used as the build contract says."""

    exit_code = 1  # the data is damaged: a runtime failure, not a typo


class NotABuildError(BuildFormatError):
    """The path holds no finished longdata build at all."""

    exit_code = 2


class UnknownSplitError(BuildFormatError, KeyError):
    """A split the build does not have; the message lists the ones it has."""

    exit_code = 2

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def split_name(stage: str | None, kind: str) -> str:
    """The name of a build split: ``kind`` (``train`` or ``validation``) of an unstaged build,
    ``<stage>/<kind>`` of a staged one. Also the split's directory inside the build."""
    return f"{stage}/{kind}" if stage else kind


def parse_split_name(name: str) -> tuple[str | None, str]:
    """``(stage, kind)`` of a split name, the inverse of ``split_name``."""
    stage, _, kind = name.rpartition("/")
    return stage or None, kind


@dataclass(frozen=True)
class StreamEntry:
    """One MDS stream (a length bucket) of a split; ``path`` is relative to the build."""

    name: str
    path: str
    rows: int
    tokens: int
    target_tokens: int
    proportion: float
    samples: int | None = None  # absent in manifests of hand-made test builds


@dataclass(frozen=True)
class SplitTotals:
    """What the builder recorded for a whole split; ``longdata verify`` holds the streams and
    their shards against it."""

    rows: int
    tokens: int
    target_tokens: int


@dataclass(frozen=True)
class OverlengthCounts:
    """What packing did to the samples longer than a split's ``max_seq_len``, under ``policy``."""

    policy: str
    truncated: int = 0
    dropped: int = 0
    split: int = 0
    middle_cut: int = 0  # absent from manifests written before truncate_middle existed
    empty: int = 0
    no_target_after_cut: int = 0

    @property
    def cut(self) -> int:
        """Samples cut to fit (kept in part)."""
        return self.truncated + self.split + self.middle_cut

    @property
    def left_out(self) -> int:
        """Samples packing could not keep at all."""
        return self.dropped + self.empty + self.no_target_after_cut


@dataclass(frozen=True)
class PackingStats:
    """How close a split's packing is to optimal: no packing can use fewer rows than
    ``max(lower_bound, long_items)``."""

    rows: int
    tokens: int
    max_len: int
    fill: float  # tokens / (rows * max_len)
    lower_bound: int  # ceil(tokens / max_len)
    long_items: int  # items longer than max_len / 2: each must own a row, a second bound
    rows_over_bound: float  # rows / max(lower_bound, long_items)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SplitEntry:
    """One split. The builder records ``samples``, ``totals``, ``overlength`` and ``packing``;
    manifests of hand-made builds may leave them out."""

    name: str
    max_seq_len: int
    stage: str | None
    streams: tuple[StreamEntry, ...]
    samples: int | None = None
    totals: SplitTotals | None = None
    overlength: OverlengthCounts | None = None
    packing: PackingStats | None = None

    @property
    def kind(self) -> str:
        return parse_split_name(self.name)[1]

    @property
    def is_train(self) -> bool:
        return self.kind == "train"

    @property
    def rows(self) -> int:
        return sum(stream.rows for stream in self.streams)

    def to_json(self) -> dict[str, Any]:
        return {
            "max_seq_len": self.max_seq_len,
            "stage": self.stage,
            "samples": self.samples,
            **(asdict(self.totals) if self.totals else {}),
            "overlength": asdict(self.overlength) if self.overlength else None,
            "packing": asdict(self.packing) if self.packing else None,
            "streams": [asdict(stream) for stream in self.streams],
        }


@dataclass
class TokenizeCounts:
    """What tokenizing one source counted (the builder's running ``TokenizeStats`` adds its
    timing, which the manifest leaves out so that builds stay byte-identical)."""

    rows_read: int = 0
    quarantined: int = 0
    samples: int = 0
    tokens: int = 0
    target_tokens: int = 0
    no_target_after_tokenize: int = 0
    offsets_fallbacks: int = 0  # samples a normaliser rewrote: masked from real offsets
    # Conversations made into one sample per assistant turn (multi_turn; docs/TEMPLATES.md), and
    # the samples they made: rows_read + turn_samples - split_conversations = samples + quarantined.
    split_conversations: int = 0
    turn_samples: int = 0
    # Assistant turns of kept conversations that became no target (under auto and per_turn): an
    # empty rendering, or a turn the template never prompts for (templates.TurnStartHidden).
    untrained_turns: int = 0
    special_token_text_rows: int = 0  # samples whose text spells a special token
    files: dict[str, dict[str, int]] = field(default_factory=dict)  # file -> FILE_COUNTS


@dataclass
class MixCounts:
    """What mixing did to one source's samples (counted while the mix runs)."""

    available: int = 0
    too_short: int = 0
    too_long: int = 0
    duplicates: int = 0  # exact and near duplicates together
    near_duplicates: int = 0  # of which found by MinHash-LSH
    validation: int = 0
    train_unique: int = 0
    language_trimmed: int = 0  # weighted samples removed to meet the language ratio
    language_upsampled: int = 0  # weighted samples repeated to meet it (mode: upsample)
    train_samples: int = 0  # after weighting, repeats counted
    train_tokens: int = 0


@dataclass(frozen=True)
class RowAccounting:
    """Where every row a source read went (``longdata.stages.accounting`` says how they add up):
    ``rows_read + turn_samples_added`` equals the sum of the fates."""

    rows_read: int
    quarantined: int
    too_short: int
    too_long: int
    duplicates: int
    validation: int
    train: int
    turn_samples_added: int = 0  # absent from manifests written before per-turn samples


@dataclass(frozen=True)
class SourceEntry:
    """One source of the build. Manifests of hand-made builds may record its name alone."""

    name: str
    kind: str | None = None
    weight: float | None = None
    tokenize: TokenizeCounts | None = None
    mix: MixCounts | None = None
    rows: RowAccounting | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "weight": self.weight,
            "tokenize": asdict(self.tokenize) if self.tokenize else None,
            "mix": asdict(self.mix) if self.mix else None,
            "rows": asdict(self.rows) if self.rows else None,
        }


@dataclass
class LanguageBalance:
    """What meeting ``language_share`` did to the weighted training tokens of each language."""

    mode: str
    share: dict[str, float]  # the share each present language was balanced to
    tokens_before: dict[str, int]
    tokens_after: dict[str, int]
    discarded: dict[str, float] = field(init=False)  # share of a language's tokens removed
    added: dict[str, float] = field(init=False)  # tokens repeated, as a share of what it had

    def __post_init__(self) -> None:
        ratio = {
            lang: self.tokens_after[lang] / have if have else 1.0
            for lang, have in self.tokens_before.items()
        }
        self.discarded = {lang: max(0.0, 1 - r) for lang, r in ratio.items()}
        self.added = {lang: max(0.0, r - 1) for lang, r in ratio.items()}

    def warnings(self, above: float) -> list[str]:
        """One line per language that lost more than ``above`` of its tokens."""
        lines = []
        for lang, lost in self.discarded.items():
            if lost > above:
                others = ", ".join(f"{o} {self.share[o]:.0%}" for o in self.share if o != lang)
                hint = (
                    " Set language_share_mode: upsample to repeat the other languages instead."
                    if self.mode == "trim" and self.share[lang] > 0
                    else ""
                )
                lines.append(
                    f"language_share: meeting {others} (mode {self.mode}) discarded {lost:.0%} "
                    f"of the {lang} training tokens ({self.tokens_before[lang]:,} -> "
                    f"{self.tokens_after[lang]:,}).{hint}"
                )
        return lines


@dataclass(frozen=True)
class TokenizerEntry:
    """Which tokenizer the build used: ``name`` as the recipe gave it, ``path`` where it was
    loaded from (or the ``builtin:`` name of a bundled one), ``sha256`` per ``tokenizer_digest``,
    ``revision`` the hub revision it was loaded at and ``chat_template`` the template the build
    rendered with, its ``chat_template_kwargs`` already bound in (``None``: none was used)."""

    name: str
    path: str | None
    vocab_size: int
    pad_token_id: int | None
    eos_token_id: int | None
    sha256: str | None
    digest_version: int = 1  # absent from manifests written before version 2 existed
    revision: str | None = None
    # Absent from manifests written before the bound template was recorded: those builds
    # rendered with the recipe's template, which the trainer no longer re-derives.
    chat_template: str | None = None


@dataclass(frozen=True)
class RecipeEntry:
    """The recipe the build ran (as validated, defaults filled in): the fields its readers use,
    and the whole document for reproducing the build (``document``)."""

    seed: int | None
    packing_algorithm: str | None
    stages: tuple[str, ...]  # packing stage names, in curriculum order
    card_dir: str | None
    special_tokens_in_text: str | None
    tokenizer_revision: str | None
    _document: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_document(cls, document: dict[str, Any]) -> RecipeEntry:
        """The entry of a recipe as ``Recipe.model_dump(mode="json")`` gives it."""
        return _recipe(_Checker(Path("the recipe")), document, "recipe")

    def document(self) -> dict[str, Any]:
        """The recipe as recorded (a copy: the entry stays as read)."""
        return copy.deepcopy(self._document)


@dataclass(frozen=True)
class BuildTotals:
    quarantined: int
    samples: int
    tokens: int
    train_rows: int
    train_tokens: int


@dataclass(frozen=True)
class Manifest:
    """A build's manifest, checked. Entries a hand-made build may leave out are ``None``."""

    build_dir: Path
    format: str
    name: str
    tokenizer: TokenizerEntry
    sources: tuple[SourceEntry, ...]
    splits: dict[str, SplitEntry]  # in stage order
    recipe: RecipeEntry | None = None
    language_balance: LanguageBalance | None = None
    totals: BuildTotals | None = None
    versions: dict[str, str] = field(default_factory=dict)

    @classmethod
    def read(cls, build_dir: str | Path) -> Manifest:
        build_dir = Path(build_dir)
        path = build_dir / MANIFEST_FILE
        if not build_dir.is_dir():
            raise NotABuildError(f"{build_dir}: not a complete longdata build (no such directory)")
        if not path.is_file():
            raise NotABuildError(
                f"{build_dir}: not a complete longdata build (no {MANIFEST_FILE} "
                "in it; it is written last)"
            )
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise BuildFormatError(f"{path}: cannot be read ({error})") from None
        if not text.strip():
            raise BuildFormatError(f"{path}: empty (the build was interrupted or the file damaged)")
        try:
            raw = json.loads(text)
        except (ValueError, RecursionError) as error:
            raise BuildFormatError(
                f"{path}: not valid JSON ({error}); truncated or edited?"
            ) from None
        return cls.parse(build_dir, raw)

    @classmethod
    def parse(cls, build_dir: str | Path, raw: Any) -> Manifest:
        """Check ``raw`` (the decoded JSON) as the manifest of ``build_dir``."""
        build_dir = Path(build_dir)
        where = build_dir / MANIFEST_FILE
        check = _Checker(where)
        if not isinstance(raw, dict):
            raise BuildFormatError(f"{where}: must hold a JSON object, not {type(raw).__name__}")
        if raw.get("format") not in SUPPORTED_FORMATS:
            raise BuildFormatError(
                f"{where}: format {raw.get('format')!r} is not one this longdata "
                f"reads ({', '.join(SUPPORTED_FORMATS)})"
            )
        recipe = (
            _recipe(check, check.mapping(raw, "recipe"), "recipe")
            if raw.get("recipe") is not None
            else None
        )
        sources = tuple(
            _source(check, check.mapping_item(s, f"sources[{i}]"), f"sources[{i}]")
            for i, s in enumerate(check.list(raw, "sources"))
        )
        splits_raw = check.mapping(raw, "splits")
        splits = {name: _split(check, build_dir, name, value) for name, value in splits_raw.items()}
        order = _stage_order(check, raw, splits, recipe.stages if recipe else ())
        versions = check.mapping(raw, "versions") if raw.get("versions") is not None else {}
        return cls(
            build_dir=build_dir,
            format=raw["format"],
            name=check.text(raw, "name", optional=True) or "",
            tokenizer=_tokenizer(check, check.mapping(raw, "tokenizer"), recipe),
            sources=sources,
            splits={name: splits[name] for name in order},
            recipe=recipe,
            language_balance=_language_balance(check, raw),
            totals=_flat(check, raw, "totals", BuildTotals),
            versions={key: check.text(versions, key, "versions") for key in versions},
        )

    def to_json(self) -> dict[str, Any]:
        """The manifest as ``manifest.json`` holds it (``write_manifest`` writes this)."""
        return {
            "format": self.format,
            "name": self.name,
            "recipe": self.recipe.document() if self.recipe else None,
            "tokenizer": asdict(self.tokenizer),
            "sources": [source.to_json() for source in self.sources],
            "language_balance": asdict(self.language_balance) if self.language_balance else None,
            "splits": {name: split.to_json() for name, split in self.splits.items()},
            "split_order": list(self.splits),  # stage order; the JSON's keys are sorted
            "totals": asdict(self.totals) if self.totals else None,
            "versions": dict(self.versions),
        }

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def source_names(self) -> tuple[str, ...]:
        return tuple(source.name for source in self.sources)

    @property
    def split_names(self) -> list[str]:
        return list(self.splits)

    def split(self, name: str) -> SplitEntry:
        if name not in self.splits:
            listed = ", ".join(self.splits) or "none"
            raise UnknownSplitError(f"no split {name!r} in {self.build_dir}; its splits: {listed}")
        return self.splits[name]

    def training_splits(self) -> list[str]:
        """The train splits in stage order: a staged build's curriculum, or just ``train``."""
        return [name for name, split in self.splits.items() if split.is_train]

    def validation_splits(self) -> list[str]:
        """The validation splits in stage order."""
        return [name for name, split in self.splits.items() if split.kind == "validation"]

    def stages(self) -> list[str | None]:
        """The stages the splits belong to, in stage order (``None``: an unstaged build)."""
        return list(dict.fromkeys(split.stage for split in self.splits.values()))

    def missing_build_records(self) -> list[str]:
        """The entries ``longdata build`` always writes that this manifest lacks (a hand-made or
        partial one): what a report over the whole build, like the card, cannot do without."""
        missing = [key for key in ("recipe", "totals") if getattr(self, key) is None]
        missing += [
            f"sources[{i}].{key}"
            for i, source in enumerate(self.sources)
            for key in ("kind", "weight", "tokenize", "mix", "rows")
            if getattr(source, key) is None
        ]
        missing += [
            f"splits[{name!r}].{key}"
            for name, split in self.splits.items()
            for key in ("samples", "totals", "overlength", "packing")
            if getattr(split, key) is None
        ]
        return missing + ([] if "longdata" in self.versions else ["versions.longdata"])

    def stream_dir(self, stream: StreamEntry) -> Path:
        """Where a stream's shards are (its path was checked to stay inside the build)."""
        return inside(self.build_dir, stream.path)


def write_manifest(manifest: Manifest) -> None:
    """Write ``manifest`` into its build directory, checked as a reader will check it (so a build
    cannot publish a manifest its readers refuse), atomically: a reader finds the old manifest or
    the new one, never a half-written file."""
    data = manifest.to_json()
    Manifest.parse(manifest.build_dir, data)
    staging = manifest.build_dir / f".{MANIFEST_FILE}.partial"
    staging.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(staging, manifest.build_dir / MANIFEST_FILE)


def _tokenizer(check: _Checker, node: dict, recipe: RecipeEntry | None) -> TokenizerEntry:
    where = "tokenizer"
    revision = check.text(node, "revision", where, optional=True)
    return TokenizerEntry(
        name=check.text(node, "name", where),
        path=check.text(node, "path", where, optional=True),
        vocab_size=check.count(node, "vocab_size", where, positive=True),
        pad_token_id=check.count(node, "pad_token_id", where, optional=True),
        eos_token_id=check.count(node, "eos_token_id", where, optional=True),
        sha256=check.text(node, "sha256", where, optional=True),
        digest_version=check.count(node, "digest_version", where, optional=True, positive=True)
        or 1,
        # Older manifests recorded the revision in the recipe only.
        revision=revision if "revision" in node else recipe and recipe.tokenizer_revision,
        chat_template=check.text(node, "chat_template", where, optional=True),
    )


def _recipe(check: _Checker, node: dict, where: str) -> RecipeEntry:
    def section(key: str) -> dict:
        return check.mapping(node, key, where) if node.get(key) is not None else {}

    packing, tokenizer = section("packing"), section("tokenizer")
    stages_where = f"{where}.packing.stages"
    stages = packing.get("stages") or []
    if not isinstance(stages, list):
        raise check.error(f"{stages_where} must be a list, not {type(stages).__name__}")
    return RecipeEntry(
        seed=check.count(node, "seed", where, optional=True),
        packing_algorithm=check.text(packing, "algorithm", f"{where}.packing", optional=True),
        stages=tuple(
            check.text(
                check.mapping_item(s, f"{stages_where}[{i}]"), "name", f"{stages_where}[{i}]"
            )
            for i, s in enumerate(stages)
        ),
        card_dir=check.text(section("output"), "card_dir", f"{where}.output", optional=True),
        special_tokens_in_text=check.text(
            tokenizer, "special_tokens_in_text", f"{where}.tokenizer", optional=True
        ),
        tokenizer_revision=check.text(tokenizer, "revision", f"{where}.tokenizer", optional=True),
        _document=node,
    )


def _source(check: _Checker, node: dict, where: str) -> SourceEntry:
    tokenize = _flat(check, node, "tokenize", TokenizeCounts, where)
    weight = node.get("weight")
    if weight is not None and (isinstance(weight, bool) or not isinstance(weight, int | float)):
        raise check.error(f"{where}.weight must be a number, got {weight!r:.80}")
    return SourceEntry(
        name=check.text(node, "name", where),
        kind=check.text(node, "kind", where, optional=True),
        weight=weight,
        tokenize=tokenize,
        mix=_flat(check, node, "mix", MixCounts, where),
        rows=_flat(check, node, "rows", RowAccounting, where),
    )


def _flat(check: _Checker, node: dict, key: str, entry: type, parent: str = "") -> Any:
    """``node[key]`` as ``entry``, a dataclass of counts (its ``files`` a map of file -> counts),
    or None where absent; a field with a default may be missing (older manifests)."""
    if node.get(key) is None:
        return None
    where = f"{parent}.{key}" if parent else key
    value = check.mapping(node, key, parent)
    values: dict[str, Any] = {}
    for spec in fields(entry):
        optional = spec.default is not MISSING or spec.default_factory is not MISSING
        if spec.name == "files":
            files = check.mapping(value, "files", where) if value.get("files") is not None else {}
            values["files"] = {
                name: {
                    what: check.count(counts, what, f"{where}.files[{name!r}]")
                    for what in check.mapping_item(counts, f"{where}.files[{name!r}]")
                }
                for name, counts in files.items()
            }
        elif value.get(spec.name) is not None or not optional:
            values[spec.name] = check.count(value, spec.name, where)
    return entry(**values)


def _language_balance(check: _Checker, raw: dict) -> LanguageBalance | None:
    if raw.get("language_balance") is None:
        return None
    node = check.mapping(raw, "language_balance")
    where = "language_balance"

    def by_language(key: str, number) -> dict:
        table = check.mapping(node, key, where)
        return {lang: number(table, lang, f"{where}.{key}") for lang in table}

    return LanguageBalance(
        mode=check.text(node, "mode", where),
        share=by_language("share", check.fraction),
        tokens_before=by_language("tokens_before", check.count),
        tokens_after=by_language("tokens_after", check.count),
    )


def _split(check: _Checker, build_dir: Path, name: str, value: Any) -> SplitEntry:
    where = f"splits[{name!r}]"
    if not isinstance(name, str) or not name:
        raise check.error(f"{where}: a split needs a name")
    try:
        inside(build_dir, name)
    except UnsafePathError as error:
        raise check.error(f"{where}: {error}") from None
    split = check.mapping_item(value, where)
    streams = []
    for i, entry in enumerate(check.list(split, "streams", where)):
        stream_where = f"{where}.streams[{i}]"
        entry = check.mapping_item(entry, stream_where)
        path = check.text(entry, "path", stream_where)
        try:
            inside(build_dir, path)
        except UnsafePathError as error:
            raise check.error(f"{stream_where}.path: {error}") from None
        streams.append(
            StreamEntry(
                name=check.text(entry, "name", stream_where),
                path=path,
                rows=check.count(entry, "rows", stream_where),
                tokens=check.count(entry, "tokens", stream_where),
                target_tokens=check.count(entry, "target_tokens", stream_where),
                proportion=check.fraction(entry, "proportion", stream_where),
                samples=check.count(entry, "samples", stream_where, optional=True),
            )
        )
    overlength = None
    if split.get("overlength") is not None:
        node = check.mapping(split, "overlength", where)
        counts = {
            f.name: check.count(node, f.name, f"{where}.overlength")
            for f in fields(OverlengthCounts)
            if f.name != "policy" and node.get(f.name) is not None
        }
        policy = check.text(node, "policy", f"{where}.overlength")
        overlength = OverlengthCounts(policy=policy, **counts)
    packing = None
    if split.get("packing") is not None:
        node = check.mapping(split, "packing", where)
        packing = PackingStats(
            **{
                f.name: (check.number if f.type == "float" else check.count)(
                    node, f.name, f"{where}.packing"
                )
                for f in fields(PackingStats)
            }
        )
    return SplitEntry(
        name=name,
        max_seq_len=check.count(split, "max_seq_len", where, positive=True),
        # Hand-made staged builds may not record the stage their split names carry.
        stage=check.text(split, "stage", where, optional=True) or parse_split_name(name)[0],
        streams=tuple(streams),
        samples=check.count(split, "samples", where, optional=True),
        totals=(
            SplitTotals(
                *(check.count(split, key, where) for key in ("rows", "tokens", "target_tokens"))
            )
            if split.get("rows") is not None
            else None
        ),
        overlength=overlength,
        packing=packing,
    )


def _stage_order(
    check: _Checker, raw: dict[str, Any], splits: dict[str, SplitEntry], stages: tuple[str, ...]
) -> list[str]:
    recorded = raw.get("split_order")
    if recorded is not None:
        if not isinstance(recorded, list) or sorted(map(str, recorded)) != sorted(splits):
            raise check.error("split_order must list every split exactly once")
        return recorded
    # Older manifests: stage position from the recipe, then train before validation.

    def position(name: str) -> tuple:
        stage = splits[name].stage
        rank = (
            stages.index(stage) if stage in stages else (splits[name].max_seq_len if stage else -1)
        )
        return rank, not splits[name].is_train, name

    return sorted(splits, key=position)


class _Checker:
    """Field checks that name the manifest and the key path in one line."""

    def __init__(self, where: Path):
        self.where = where

    def error(self, message: str) -> BuildFormatError:
        return BuildFormatError(f"{self.where}: {message}")

    def _get(self, node: dict, key: str, parent: str, optional: bool) -> Any:
        label = f"{parent}.{key}" if parent else key
        if key not in node or node[key] is None:
            if optional:
                return None
            raise self.error(f"{label} is missing")
        return node[key]

    def mapping(self, node: dict, key: str, parent: str = "") -> dict:
        value = self._get(node, key, parent, False)
        return self.mapping_item(value, f"{parent}.{key}" if parent else key)

    def mapping_item(self, value: Any, label: str) -> dict:
        if not isinstance(value, dict):
            raise self.error(f"{label} must be an object, not {type(value).__name__}")
        return value

    def list(self, node: dict, key: str, parent: str = "") -> list:
        value = self._get(node, key, parent, False)
        if not isinstance(value, list):
            raise self.error(
                f"{parent + '.' if parent else ''}{key} must be a list, not {type(value).__name__}"
            )
        return value

    def text(self, node: dict, key: str, parent: str = "", optional: bool = False) -> str | None:
        value = self._get(node, key, parent, optional)
        if value is not None and not isinstance(value, str):
            raise self.error(
                f"{parent + '.' if parent else ''}{key} must be a string, got {value!r:.80}"
            )
        return value

    def count(
        self, node: dict, key: str, parent: str = "", optional: bool = False, positive: bool = False
    ) -> int | None:
        value = self._get(node, key, parent, optional)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if positive else 0):
            bound = "a positive" if positive else "a non-negative"
            raise self.error(
                f"{parent + '.' if parent else ''}{key} must be {bound} integer, got {value!r:.80}"
            )
        return value

    def number(self, node: dict, key: str, parent: str = "") -> float:
        value = self._get(node, key, parent, False)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise self.error(
                f"{parent + '.' if parent else ''}{key} must be a finite number, got {value!r:.80}"
            )
        return value

    def fraction(self, node: dict, key: str, parent: str = "") -> float:
        value = self._get(node, key, parent, False)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or not 0 <= value <= 1
        ):
            raise self.error(
                f"{parent + '.' if parent else ''}{key} must be a number in [0, 1], "
                f"got {value!r:.80}"
            )
        return float(value)
