"""The build's tokenizer, saved next to the trained weights so a checkpoint is self-contained.

A build records its tokenizer in `manifest.json` (`tokenizer.path`: a local directory, a hub id
or, for a bundled tokenizer, its `builtin:` name; and `tokenizer.sha256`, a digest of the
vocabulary, merges and special tokens). The trainer
saves that tokenizer into `OUT/final`, so `AutoTokenizer.from_pretrained(OUT/final)` gives back
the exact token ids the model was trained on, and `longdata eval` needs nothing else.

The digest is recomputed before saving: a hub tokenizer that changed since the build, or a local
path that now holds another tokenizer, is refused rather than saved next to a model it does not
match.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from longdata.format import (
    Manifest,
    tokenizer_digest,
    tokenizer_location,
)
from longdata.format.remote_code import refuse_remote_code

# Any one of these marks a directory that AutoTokenizer can load from.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class TokenizerUnavailable(RuntimeError):
    """No tokenizer that matches the model could be found."""


def load_build_tokenizer(build_dir: str | Path) -> Any:
    """The tokenizer a build was tokenized with, with the chat template the build rendered with
    (as its manifest records it, kwargs bound in), so a saved checkpoint renders as it was trained.

    Raises `TokenizerUnavailable` if it cannot be loaded or its digest differs from the
    manifest's.
    """
    from transformers import AutoTokenizer

    manifest = Manifest.read(build_dir)
    info = manifest.tokenizer
    where = tokenizer_location(info)
    refuse_remote_code(where)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(where), revision=info.revision, use_fast=True, trust_remote_code=False
        )
    except (OSError, ValueError) as error:
        raise TokenizerUnavailable(
            f"cannot load the build's tokenizer {where!r}: {error}"
        ) from None
    # Manifests written before the bound template was recorded keep the tokenizer's own; a
    # version 2 digest then tells whether that is the one the build rendered with.
    if info.chat_template:
        tokenizer.chat_template = info.chat_template
    # A version 2 digest covers the bound chat template, so it is compared once that is set.
    expected = info.sha256
    if expected and tokenizer_digest(tokenizer, info.digest_version) != expected:
        raise TokenizerUnavailable(
            f"the tokenizer at {where!r} is not the one the build used (digest differs from "
            "manifest.json's tokenizer.sha256)"
        )
    return tokenizer


def save_build_tokenizer(build_dir: str | Path, out_dir: str | Path) -> str | None:
    """Save the build's tokenizer into `out_dir`; return why not if it cannot (never raises)."""
    try:
        tokenizer = load_build_tokenizer(build_dir)
    except (TokenizerUnavailable, OSError, ValueError) as error:
        return str(error)
    tokenizer.save_pretrained(str(out_dir))
    return None


def load_model_tokenizer(model: str, override: str | None = None) -> Any:
    """The tokenizer for evaluating `model`: `override` if given, else the model's own.

    `override` may be a tokenizer directory, a hub id, or a build directory (whose manifest
    names its tokenizer).
    """
    from transformers import AutoTokenizer

    where = override or model
    refuse_remote_code(where)
    if (Path(where) / "manifest.json").is_file():
        return load_build_tokenizer(where)
    problem = None
    if Path(where).is_dir() and not any((Path(where) / f).is_file() for f in TOKENIZER_FILES):
        problem = "no tokenizer files in the directory"
    else:
        try:
            return AutoTokenizer.from_pretrained(str(where), use_fast=True, trust_remote_code=False)
        except (OSError, ValueError, TypeError, AttributeError) as error:
            problem = f"{type(error).__name__}: {error}"
    if override:
        raise TokenizerUnavailable(f"cannot load tokenizer {override!r} ({problem})")
    raise TokenizerUnavailable(
        f"{model} has no usable tokenizer ({problem}). Checkpoints saved by `longdata train` "
        "include the build's tokenizer; for other models pass --tokenizer with a tokenizer "
        "directory, a hub id, or the build directory the model was trained on."
    )
