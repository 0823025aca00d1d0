"""The tokenizer identity a manifest records, and how a consumer finds that tokenizer again.

``tokenizer.sha256`` in manifest.json is ``tokenizer_digest`` of the tokenizer the build used;
``tokenizer_location`` turns a manifest's ``tokenizer`` entry back into something
``AutoTokenizer.from_pretrained`` loads (a bundled tokenizer is recorded by its ``builtin:``
name, so a manifest does not depend on where longdata is installed). The builder resolves the
recipe's ``chat_template`` (``resolve_template``: inline Jinja, or a file it names), binds its
``chat_template_kwargs`` (``bind_template_kwargs``) and records the result as the manifest's
``tokenizer.chat_template``: consumers take that, never the recipe's input.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from longdata.format.manifest import TokenizerEntry

BUILTIN_TOKENIZERS = {
    "builtin:quickstart": Path(__file__).resolve().parent.parent
    / "assets"
    / "quickstart_tokenizer",
}


class TemplateError(ValueError):
    """A chat template that cannot be used (a build-level, not row-level, fault)."""


def tokenizer_location(info: TokenizerEntry) -> str:
    """Where to load the tokenizer a manifest's ``tokenizer`` entry names: a bundled one from
    this installation, otherwise its recorded local path or hub id."""
    builtin = BUILTIN_TOKENIZERS.get(info.name)
    return str(builtin) if builtin else info.path or info.name


# manifest.json's ``tokenizer.digest_version``; a manifest without one holds a version 1 digest.
DIGEST_VERSION = 2
# The parts of tokenizer.json that say how text becomes ids. transformers 5 rewrites others as
# it loads a tokenizer (the post-processor, for one), so version 1, a hash of the whole
# serialisation, differed between transformers 4.x and 5.x for the same files.
DEFINITION_PARTS = ("model", "normalizer", "pre_tokenizer", "decoder")


def tokenizer_digest(tokenizer, version: int = DIGEST_VERSION) -> str:
    """What manifest.json's ``tokenizer.sha256`` holds.

    Version 2: the tokenizer's definition (vocabulary, merges, normalisation and
    pre-tokenization; added tokens by id, text and specialness), its special tokens and the chat
    template bound to it, so equal under transformers 4.57 and 5.x. Version 1 (manifests without
    ``digest_version``): the whole backend serialisation and the special tokens.
    """
    if version == 1:
        digest = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode())
        digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True).encode())
        return digest.hexdigest()
    if version != DIGEST_VERSION:
        raise TemplateError(f"unknown tokenizer digest_version {version!r}")
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    definition = {part: spec.get(part) for part in DEFINITION_PARTS}
    definition["added_tokens"] = sorted(
        (token["id"], token["content"], token["special"]) for token in spec["added_tokens"]
    )
    # The named roles only: 4.57 also lists `additional_special_tokens` here and 5.x does not;
    # which tokens are special is already in `added_tokens`.
    definition["special_tokens"] = {
        role: token
        for role, token in tokenizer.special_tokens_map.items()
        if role != "additional_special_tokens"
    }
    definition["chat_template"] = tokenizer.chat_template
    canonical = json.dumps(definition, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def resolve_template(value: str | None) -> str | None:
    """A template given inline, or the contents of the file it names.

    A value without Jinja syntax must name a file: a mistyped path would otherwise be taken for
    a template whose output holds no assistant turn, and every row would be quarantined.
    """
    if not value or "{%" in value or "{{" in value:
        return value
    if not Path(value).is_file():
        raise TemplateError(
            f"tokenizer.chat_template {value!r} is neither a Jinja template nor a file"
        )
    return Path(value).read_text(encoding="utf-8")


def bind_template_kwargs(
    template: str, kwargs: Mapping[str, bool | int | float | str | None]
) -> str:
    """``template`` with ``kwargs`` set as template variables at its top (``{%- set k = v %}``).

    Binding them into the template text, rather than passing them to each
    ``apply_chat_template`` call, makes every rendering agree: the build, NIAH prompts, and any
    tool that loads the checkpoint's saved tokenizer. A top-level ``set`` takes precedence over
    a variable passed at render time, so the checkpoint renders as it was trained.
    """
    bindings = "".join(
        f"{{%- set {name} = {_jinja_literal(value)} %}}" for name, value in sorted(kwargs.items())
    )
    return bindings + template


def _jinja_literal(value: bool | int | float | str | None) -> str:
    if value is None or isinstance(value, bool):
        return {None: "none", True: "true", False: "false"}[value]
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # Jinja decodes string escapes like Python
    return repr(value)
