"""The recipe: a YAML file describing one build, validated before any work starts.

Loading goes YAML -> plain dict -> ``--set`` overrides -> pydantic models. Every validation
problem becomes one line naming the key path (``sources[1].weight: must be > 0, got -1``), so a
user fixes a recipe without reading a traceback.

Validation bounds the work before any starts: the YAML's size and its expansion (aliases), every
generator count and length, finite numbers only, ordered ranges, names that are safe path parts,
and local files (sources, tokenizer, chat template) that exist. ``check_against_tokenizer`` adds
what needs the tokenizer: a ``max_seq_len`` that holds at least the template's own tokens.
"""

from __future__ import annotations

import re
import reprlib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from longdata.format import settings
from longdata.format.paths import check_slug
from longdata.format.yaml_budget import MAX_YAML_NODES, exceeds_node_budget
from longdata.stages.control_tokens import SPECIAL_TOKENS_IN_TEXT
from longdata.stages.packing import ALGORITHMS, OVERLENGTH_POLICIES

MULTI_TURN_POLICIES = ("auto", "per_turn", "last_turn")
# Variables longdata itself passes to every rendering.
RESERVED_TEMPLATE_VARIABLES = ("messages", "add_generation_prompt")

GENERIC_FORMATS = ("messages", "sharegpt", "alpaca")
COMPRESSION = re.compile(r"^(zstd|br|gz|snappy)(:\d+)?$")
SIZE = re.compile(r"^(\d+)\s*(b|kb|mb|gb)?$", re.IGNORECASE)
SIZE_UNITS = {"b": 1, "kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30}
# Bounds on the work a recipe can ask for, checked before any starts.
MAX_GENERATED_ROWS = 10_000_000
MAX_SEQ_LEN = 1 << 24  # tokens in one row: far beyond any model's context
MAX_SAMPLE_CHARS = 50_000_000
MAX_NEEDLES = 64
MAX_PROBLEM_CHARS = 300
# A source path that looks like a file system path must exist; anything else may be a hub id.
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


class RecipeError(ValueError):
    """A recipe that cannot be used; ``problems`` holds one line per wrong key."""

    def __init__(self, problems: list[str]):
        # A problem may quote user input: each is kept to one short line.
        problems = [
            p if len(p) <= MAX_PROBLEM_CHARS else p[:MAX_PROBLEM_CHARS] + " ..." for p in problems
        ]
        super().__init__("\n".join(problems))
        self.problems = problems


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# A name that becomes a path part (build, card, stage and cache directories, quarantine files).
SafeName = Annotated[str, AfterValidator(lambda value: check_slug(value, "name"))]


def _looks_local(path: str) -> bool:
    """A path a hub id cannot be: absolute, relative with ./ or ~, a data file, or deeper than
    ``owner/name``."""
    return (
        path.startswith(("/", "./", "../", "~", ".\\"))
        or path.endswith(DATA_SUFFIXES)
        or path.count("/") > 1
    )


class TokenizerConfig(Strict):
    name: str = Field(description="local path, hub id, or builtin:quickstart")
    revision: str | None = None
    chat_template: str | None = Field(
        default=None,
        description="Jinja template text or a path to a .jinja file; default: the tokenizer's own",
    )
    chat_template_kwargs: dict[str, bool | int | float | str | None] = Field(
        default_factory=dict,
        description="template variables, e.g. {enable_thinking: false}; bound into the template "
        "so the build, NIAH prompts and the saved checkpoint render alike",
    )
    multi_turn: Literal[MULTI_TURN_POLICIES] = Field(
        default="auto",
        description="auto: one sample per conversation, or one per assistant turn where the "
        "template rewrites earlier turns; per_turn: always one per assistant turn; "
        "last_turn: only the final assistant turn is trained (docs/TEMPLATES.md)",
    )

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_variable_names(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in value:
            if (
                not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name)
                or name in RESERVED_TEMPLATE_VARIABLES
            ):
                raise ValueError(
                    f"{name!r} cannot be set: keys must be template variable names other "
                    f"than {', '.join(RESERVED_TEMPLATE_VARIABLES)}"
                )
        return value

    special_tokens_in_text: Literal[SPECIAL_TOKENS_IN_TEXT] = Field(
        default="encode_as_text",
        description="text that spells a special token: encoded as text (default) or, with allow, "
        "as the control token itself",
    )

    @field_validator("name")
    @classmethod
    def _tokenizer_exists(cls, value: str) -> str:
        from longdata.stages.templates import BUILTIN_TOKENIZERS

        if value.startswith("builtin:") and value not in BUILTIN_TOKENIZERS:
            raise ValueError(
                f"unknown bundled tokenizer {value!r}; available: {', '.join(BUILTIN_TOKENIZERS)}"
            )
        if _looks_local(value) and not Path(value).expanduser().is_dir():
            raise ValueError(f"tokenizer directory {value!r} does not exist")
        return value

    @field_validator("chat_template")
    @classmethod
    def _template_exists(cls, value: str | None) -> str | None:
        from longdata.stages.templates import TemplateError, resolve_template

        try:
            resolve_template(value)
        except TemplateError as exc:
            raise ValueError(str(exc).removeprefix("tokenizer.chat_template ")) from None
        return value


class SampleSpec(Strict):
    """How to generate a ``builtin:sample/<schema>`` file (offline stand-in for a real dataset)."""

    rows: int = Field(default=32, gt=0, le=MAX_GENERATED_ROWS)
    min_chars: int = Field(default=20_000, gt=0, le=MAX_SAMPLE_CHARS)
    max_chars: int = Field(default=80_000, gt=0, le=MAX_SAMPLE_CHARS)
    zh_fraction: float = Field(default=0.1, ge=0, le=1)
    seed: int = 0

    @model_validator(mode="after")
    def _chars_ordered(self) -> SampleSpec:
        if self.min_chars > self.max_chars:
            raise ValueError(
                f"min_chars ({self.min_chars}) must be <= max_chars ({self.max_chars})"
            )
        return self


class SourceBase(Strict):
    name: SafeName
    weight: float = Field(default=1.0, gt=0, description="multiplies the source's token count")
    max_samples: int | None = Field(default=None, gt=0)
    min_tokens: int = Field(
        default=1, ge=1, le=MAX_SEQ_LEN, description="drop samples shorter than this"
    )
    max_tokens: int | None = Field(default=None, gt=0, description="drop samples longer than this")

    @model_validator(mode="after")
    def _token_range_ordered(self) -> SourceBase:
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})"
            )
        return self


class FileSource(SourceBase):
    path: str = Field(
        description="local file or directory, hub dataset id, or builtin:sample/<schema>"
    )
    split: str = "train"
    sample: SampleSpec = SampleSpec()

    @field_validator("path")
    @classmethod
    def _local_path_exists(cls, value: str) -> str:
        if (
            not value.startswith("builtin:")
            and _looks_local(value)
            and not Path(value).expanduser().exists()
        ):
            raise ValueError(f"no such file or directory: {value!r}")
        return value


class ChatFileSource(FileSource):
    strip_messages: bool = Field(
        default=False,
        description="turn CRLF into LF and trim whitespace at the edges of every message; off by "
        "default because a template renders text as written (docs/TEMPLATES.md)",
    )


class LongAlignSource(ChatFileSource):
    kind: Literal["longalign"]


class LongAlpacaSource(ChatFileSource):
    kind: Literal["longalpaca"]


class GenericSource(ChatFileSource):
    kind: Literal["generic"]
    format: Literal[GENERIC_FORMATS]


class TextSource(FileSource):
    """Raw documents for continued pretraining: every token is a target, no chat template."""

    kind: Literal["text"]
    text_field: str = Field(
        default="text",
        min_length=1,
        description="the field holding the document in JSONL/Parquet rows",
    )
    glob: str | None = Field(
        default=None,
        description="read a directory as text files matching this pattern (one "
        "document per file, sorted by path); without it a directory is read as JSONL/Parquet rows",
    )


class AntiHaystackSource(SourceBase):
    kind: Literal["antihaystack"]
    count: int = Field(gt=0, le=MAX_GENERATED_ROWS)
    length_range: tuple[int, int] = Field(description="[min, max] document tokens")
    depth_range: tuple[float, float] = (0.0, 1.0)
    needles: tuple[int, int] = (1, 3)
    tasks: tuple[
        Literal["needle", "paragraph", "multikey", "multivalue", "vartrack", "cwe", "qa"], ...
    ] = Field(default=("needle", "paragraph"), min_length=1)
    zh_fraction: float = Field(default=0.1, ge=0, le=1)
    seed: int = 0
    haystack: tuple[str, ...] | None = Field(
        default=None,
        description="real filler text instead of generated prose: text files, "
        "directories of them, JSONL/Parquet with a text field, or names of kind: text sources",
    )

    @field_validator("haystack", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _ranges_ordered(self) -> AntiHaystackSource:
        lo, hi = self.length_range
        if not 0 < lo <= hi <= MAX_SEQ_LEN:
            raise ValueError(
                f"length_range must satisfy 0 < min <= max <= {MAX_SEQ_LEN:,}, "
                f"got {list(self.length_range)}"
            )
        if not 1 <= self.needles[0] <= self.needles[1] <= MAX_NEEDLES:
            raise ValueError(
                f"needles must satisfy 1 <= min <= max <= {MAX_NEEDLES}, got {list(self.needles)}"
            )
        dlo, dhi = self.depth_range
        if not 0.0 <= dlo <= dhi <= 1.0:
            raise ValueError(f"depth_range must lie within [0, 1] and be ordered, got {[dlo, dhi]}")
        return self


Source = Annotated[
    LongAlignSource | LongAlpacaSource | GenericSource | TextSource | AntiHaystackSource,
    Field(discriminator="kind"),
]
SOURCE_KINDS = ("longalign", "longalpaca", "generic", "text", "antihaystack")


class NearDedup(Strict):
    """MinHash-LSH near-duplicate removal on token shingles (see longdata/stages/near_dedup.py)."""

    threshold: float = Field(
        default=0.8,
        gt=0,
        le=1,
        description="estimated Jaccard similarity "
        "of token n-gram sets at or above which a later sample is a duplicate",
    )
    num_perm: int = Field(default=128, ge=16, le=1024, description="MinHash permutations")
    ngram: int = Field(default=5, ge=1, le=64, description="shingle length in tokens")


class DedupConfig(Strict):
    exact: bool = Field(default=True, description="drop samples whose rendered text repeats")
    near: NearDedup | None = None


class Stage(Strict):
    """One step of a context-length curriculum: the whole mix packed to this stage's length."""

    name: SafeName
    max_seq_len: int = Field(ge=16, le=MAX_SEQ_LEN)
    buckets: tuple[Annotated[int, Field(gt=0, le=MAX_SEQ_LEN)], ...] | None = None
    overlength: Literal[OVERLENGTH_POLICIES] | None = Field(
        default=None, description="this stage's over-length policy (default: packing.overlength)"
    )


class PackingConfig(Strict):
    max_seq_len: int | None = Field(
        default=None, ge=16, le=MAX_SEQ_LEN, description="required unless stages are given"
    )
    algorithm: Literal[ALGORITHMS] = "bfd"
    overlength: Literal[OVERLENGTH_POLICIES] = "truncate"
    buckets: tuple[Annotated[int, Field(gt=0, le=MAX_SEQ_LEN)], ...] | None = Field(
        default=None, description="row-length bucket edges; each bucket is its own MDS stream"
    )
    stages: tuple[Stage, ...] | None = None

    @model_validator(mode="after")
    def _stages_increase(self) -> PackingConfig:
        if not self.stages and self.max_seq_len is None:
            raise ValueError("max_seq_len is required (or list curriculum stages)")
        if self.stages and self.max_seq_len not in (None, self.stages[-1].max_seq_len):
            raise ValueError(
                f"max_seq_len ({self.max_seq_len}) must equal the last stage's "
                f"max_seq_len ({self.stages[-1].max_seq_len}) or be left out"
            )
        if self.stages:
            lengths = [s.max_seq_len for s in self.stages]
            if lengths != sorted(set(lengths)):
                raise ValueError(f"stages must have strictly increasing max_seq_len, got {lengths}")
            names = [s.name for s in self.stages]
            if len(set(names)) != len(names):
                raise ValueError(f"stage names must be unique, got {names}")
        return self


class ValidationSplit(Strict):
    fraction: float = Field(default=0.02, ge=0, lt=1)
    max_samples: int = Field(default=64, ge=0)


class OutputConfig(Strict):
    dir: str
    # Validated also when defaulted: the MDS writer takes bytes, not "64MB".
    shard_size_limit: str | int = Field("64MB", validate_default=True)
    compression: str | None = "zstd"
    card_dir: str = Field(
        default="data_cards",
        description="the card is copied to <card_dir>/<name>; "
        "a relative path is relative to the working directory, like dir",
    )

    @field_validator("compression")
    @classmethod
    def _known_compression(cls, value: str | None) -> str | None:
        if value is not None and not COMPRESSION.match(value):
            raise ValueError(
                f"must be one of zstd, br, gz, snappy (optionally ':level') or null, got {value!r}"
            )
        return value

    @field_validator("shard_size_limit")
    @classmethod
    def _parse_size(cls, value: str | int) -> int:
        if isinstance(value, int):
            if value <= 0:
                raise ValueError(f"must be > 0, got {value}")
            return value
        match = SIZE.match(value.strip())
        if not match:
            raise ValueError(f"must be a size like 64MB or 1GB, got {value!r}")
        return int(match[1]) * SIZE_UNITS[(match[2] or "b").lower()]


class Recipe(Strict):
    """One build. ``longest_seq_len`` is the longest row any split may hold."""

    name: SafeName
    seed: int = 0
    tokenizer: TokenizerConfig
    sources: tuple[Source, ...] = Field(min_length=1)
    packing: PackingConfig
    validation: ValidationSplit = ValidationSplit()
    output: OutputConfig
    dedup: DedupConfig = Field(
        default=DedupConfig(),
        description="exact, none, or {exact: bool, near: {threshold, num_perm, ngram}}",
    )
    language_share: dict[Literal["en", "zh"], float] | None = Field(
        default=None, description="wanted share of train tokens per language, e.g. {zh: 0.1}"
    )
    language_share_mode: Literal["trim", "upsample"] = Field(
        default="trim",
        description="trim: down-sample languages over their share; upsample: "
        "repeat languages under their share instead (a share of 0 still trims)",
    )
    language_share_warn: float = Field(
        default=0.25,
        ge=0,
        le=1,
        description="warn when trimming discards more than this share of a language's tokens",
    )
    cache_dir: str = ".longdata_cache"

    @property
    def has_chat_sources(self) -> bool:
        """Whether any source is rendered with the chat template (all but ``kind: text``)."""
        return any(source.kind != "text" for source in self.sources)

    @property
    def text_sources(self) -> dict[str, TextSource]:
        """The ``kind: text`` sources by name (what an anti-haystack ``haystack`` may name)."""
        return {source.name: source for source in self.sources if isinstance(source, TextSource)}

    @property
    def shortest_seq_len(self) -> int:
        stages = self.packing.stages
        return stages[0].max_seq_len if stages else self.packing.max_seq_len

    @property
    def longest_seq_len(self) -> int:
        stages = self.packing.stages
        return stages[-1].max_seq_len if stages else self.packing.max_seq_len

    @field_validator("dedup", mode="before")
    @classmethod
    def _dedup_shorthand(cls, value: Any) -> Any:
        """``exact`` and ``none`` (the original spellings) stand for the exact-only settings."""
        if value == "exact":
            return {"exact": True}
        if value == "none":
            return {"exact": False}
        if isinstance(value, str):
            raise ValueError(f"must be exact, none or a mapping with exact/near, got {value!r}")
        return value

    @field_validator("language_share")
    @classmethod
    def _shares_are_fractions(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value and (
            any(not 0 <= v <= 1 for v in value.values()) or sum(value.values()) > 1 + 1e-9
        ):
            raise ValueError(f"shares must lie in [0, 1] and sum to at most 1, got {value}")
        return value

    @model_validator(mode="after")
    def _unique_source_names(self) -> Recipe:
        names = [s.name for s in self.sources]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"source names must be unique, repeated: {', '.join(duplicated)}")
        return self

    @model_validator(mode="after")
    def _haystacks_name_text_sources(self) -> Recipe:
        """A haystack entry that names another source must name a ``kind: text`` one."""
        kinds = {s.name: s.kind for s in self.sources}
        for source in self.sources:
            for entry in getattr(source, "haystack", None) or ():
                if kinds.get(entry, "text") != "text":
                    raise ValueError(
                        f"source {source.name}: haystack {entry!r} names a "
                        f"{kinds[entry]} source; only kind: text sources can be haystacks"
                    )
        return self


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, override and validate a recipe; raise RecipeError listing every problem."""
    try:
        data = settings.read_settings_file(path, "recipe")
    except settings.SettingError as error:
        raise RecipeError([str(error)]) from None
    for override in overrides:
        apply_override(data, override)
    return validate_recipe(data)


def validate_recipe(data: dict[str, Any]) -> Recipe:
    _check_size(data)
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        # A list whose items failed also fails its length check (they are not counted): that
        # second line would be about items the user did write.
        raise RecipeError(
            [
                describe_error(err)
                for err in errors
                if not (
                    err["type"] == "too_short"
                    and any(
                        other["loc"][: len(err["loc"])] == err["loc"]
                        and len(other["loc"]) > len(err["loc"])
                        for other in errors
                    )
                )
            ]
        ) from None


def _check_size(data: Any) -> None:
    """Refuse a recipe that expands to more than MAX_YAML_NODES values (an alias bomb)."""
    if exceeds_node_budget(data):
        raise RecipeError(
            [
                f"recipe: expands to more than {MAX_YAML_NODES:,} values (YAML aliases?); "
                "a recipe is a short list of settings"
            ]
        )


def check_against_tokenizer(recipe: Recipe, tokenizer=None) -> None:
    """The checks that need the tokenizer: each ``max_seq_len`` must hold more than the template's
    own tokens for a one-turn conversation. ``tokenizer`` is loaded here when not given, but only
    from the package or a local directory: a hub tokenizer is checked when ``build`` loads it."""
    from longdata.stages.templates import BUILTIN_TOKENIZERS, load_tokenizer, template_overhead

    if not recipe.has_chat_sources:  # documents carry no template overhead
        return
    if tokenizer is None:
        if (
            recipe.tokenizer.name not in BUILTIN_TOKENIZERS
            and not Path(recipe.tokenizer.name).is_dir()
        ):
            return
        tokenizer, _ = load_tokenizer(recipe.tokenizer)
    overhead = template_overhead(tokenizer)
    if recipe.shortest_seq_len <= overhead:
        key = "packing.stages[0].max_seq_len" if recipe.packing.stages else "packing.max_seq_len"
        raise RecipeError(
            [
                f"{key}: {recipe.shortest_seq_len} cannot hold one conversation: the chat "
                f"template alone takes {overhead} tokens for a one-turn exchange"
            ]
        )


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply ``key.path=value`` (``sources[1].weight=2`` or ``sources.1.weight=2``) in place, in
    the grammar ``longdata train --set`` uses too (``longdata.format.settings``): the value is
    read as YAML, so ``true``, ``[4096, 8192]`` and ``null`` mean what they say.
    """
    try:
        settings.assign(data, settings.parse_assignment(assignment))
    except settings.SettingError as error:
        raise RecipeError([str(error)]) from None


def describe_error(err: dict[str, Any]) -> str:
    """One line per pydantic error, phrased for a person editing YAML."""
    path = _key_path(err["loc"])
    kind, ctx, given = err["type"], err.get("ctx", {}), err.get("input")
    if kind == "extra_forbidden":
        return settings.unknown_key(path, _allowed_keys(err["loc"]))
    if kind == "missing":
        return f"{path}: required key is missing"
    if kind == "union_tag_invalid" or kind == "union_tag_not_found":
        return (
            f"{path}.kind: must be one of {', '.join(SOURCE_KINDS)}, got {given.get('kind')!r}"
            if isinstance(given, dict) and "kind" in given
            else f"{path}: needs a kind: one of {', '.join(SOURCE_KINDS)}"
        )
    comparisons = {
        "greater_than": ">",
        "greater_than_equal": ">=",
        "less_than": "<",
        "less_than_equal": "<=",
    }
    if kind in comparisons:
        bound = next(iter(ctx.values()))
        return f"{path}: must be {comparisons[kind]} {bound:g}, got {_short(given)}"
    if kind == "too_short":
        return f"{path}: needs at least {ctx.get('min_length')} item(s), got {_short(given)}"
    if kind == "literal_error":
        return f"{path}: must be one of {ctx.get('expected')}, got {_short(given)}"
    message = err["msg"].removeprefix("Value error, ")
    return f"{path}: {message}" + ("" if kind == "value_error" else f", got {_short(given)}")


def _short(value: Any) -> str:
    """A bounded repr: the input may be huge or deeply nested."""
    return _SHORT_REPR.repr(value)


_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxstring = _SHORT_REPR.maxother = 80
_SHORT_REPR.maxlevel = 3


def _key_path(loc: tuple[Any, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part in SOURCE_KINDS and text.startswith("sources["):
            continue  # pydantic puts the union tag in the path; the user never wrote it
        else:
            text += f".{part}" if text else str(part)
    return text or "recipe"


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    """Walk the models along ``loc`` to list the keys that would have been accepted."""
    model: Any = Recipe
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if part in SOURCE_KINDS:
            model = {
                "longalign": LongAlignSource,
                "longalpaca": LongAlpacaSource,
                "generic": GenericSource,
                "text": TextSource,
                "antihaystack": AntiHaystackSource,
            }[part]
            continue
        field = model.model_fields.get(part) if isinstance(model, type) else None
        if field is None:
            return []
        model = _model_of(field.annotation)
    return (
        sorted(model.model_fields)
        if isinstance(model, type) and issubclass(model, BaseModel)
        else []
    )


def _model_of(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_of(arg)
        if found is not None:
            return found
    return None
