"""The build contract: what a longdata build directory holds and how to read it safely.

Both the builder (``longdata``) and the trainer (``trainer``) import this package, and it is the
only part of ``longdata`` the trainer imports. It needs numpy and the standard library only (no
torch, pydantic or numba):

- ``manifest``: the typed, versioned ``Manifest`` (read, validate, write ``manifest.json``)
  and the one way split names are composed and parsed (``split_name``/``parse_split_name``);
- ``rows``: the row schema and ``check_row``;
- ``mds``: the one MDS row reader for tools, and the shard hash checks;
- ``paths``: safe names (``check_slug``), paths kept inside their base (``inside``), and the
  marker that says a directory was written by longdata (``is_ours``);
- ``tokenizer``: the tokenizer identity a manifest records and where to load it from;
- ``settings``: the one ``--set key=value`` grammar of ``build`` and ``train`` (YAML value
  typing, coercion to a declared type, the one-line unknown-key report).
"""

from longdata.format.manifest import (
    FORMAT,
    MANIFEST_FILE,
    SUPPORTED_FORMATS,
    BuildFormatError,
    Manifest,
    NotABuildError,
    RecipeEntry,
    SourceEntry,
    SplitEntry,
    StreamEntry,
    TokenizerEntry,
    UnknownSplitError,
    parse_split_name,
    split_name,
    write_manifest,
)
from longdata.format.mds import ShardError, StreamReader, check_stream_files, load_shard, read_index
from longdata.format.paths import (
    MARKER_FILE,
    UnsafePathError,
    check_slug,
    inside,
    is_ours,
    mark_ours,
    marker_kind,
)
from longdata.format.rows import (
    COLUMNS,
    IGNORE_INDEX,
    SHARD_HASHES,
    check_row,
    row_labels,
    row_structure_problem,
    sample_starts,
)
from longdata.format.tokenizer import (
    BUILTIN_TOKENIZERS,
    TemplateError,
    bind_template_kwargs,
    resolve_template,
    tokenizer_digest,
    tokenizer_location,
)

__all__ = [
    "BUILTIN_TOKENIZERS",
    "COLUMNS",
    "FORMAT",
    "MANIFEST_FILE",
    "MARKER_FILE",
    "SHARD_HASHES",
    "SUPPORTED_FORMATS",
    "BuildFormatError",
    "Manifest",
    "NotABuildError",
    "RecipeEntry",
    "ShardError",
    "SourceEntry",
    "SplitEntry",
    "StreamEntry",
    "StreamReader",
    "TemplateError",
    "TokenizerEntry",
    "UnknownSplitError",
    "UnsafePathError",
    "bind_template_kwargs",
    "check_row",
    "check_slug",
    "check_stream_files",
    "inside",
    "is_ours",
    "load_shard",
    "mark_ours",
    "marker_kind",
    "parse_split_name",
    "read_index",
    "resolve_template",
    "row_structure_problem",
    "row_labels",
    "sample_starts",
    "IGNORE_INDEX",
    "split_name",
    "tokenizer_digest",
    "tokenizer_location",
    "write_manifest",
]
