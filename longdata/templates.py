"""Chat template rendering and the assistant-only loss mask, for any template.

``apply_chat_template(..., return_assistant_tokens_mask=True)`` only works for templates with
``{% generation %}`` tags and silently returns zeros for the rest (Llama 3.1's among them). So the
mask is built from character offsets instead: an assistant turn spans from the end of the
conversation rendered up to it *with* the generation prompt to the end of the conversation
rendered *including* it. Tokens overlapping such a span are targets; this covers the assistant's
text and its end-of-turn token and nothing the user or system wrote.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from longdata.recipe import TokenizerConfig
from longdata.records import Message

BUILTIN_TOKENIZERS = {"builtin:quickstart": Path(__file__).parent / "assets" / "quickstart_tokenizer"}


class TemplateError(ValueError):
    """The chat template cannot give a reliable assistant mask. Raised while loading, it stops the
    build; raised while rendering one conversation, it quarantines that row (longdata.tokenize)."""


@dataclass(frozen=True)
class TokenizerInfo:
    name: str
    path: str
    vocab_size: int
    pad_token_id: int | None
    eos_token_id: int | None
    sha256: str

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def load_tokenizer(config: TokenizerConfig):
    """The fast tokenizer named by the recipe, and facts about it for the manifest and cache keys."""
    from transformers import AutoTokenizer

    path = str(BUILTIN_TOKENIZERS.get(config.name, config.name))
    tokenizer = AutoTokenizer.from_pretrained(path, revision=config.revision, use_fast=True)
    if not tokenizer.is_fast:
        raise TemplateError(f"{config.name}: a fast (Rust) tokenizer is required for offsets")
    template = resolve_template(config.chat_template) or tokenizer.chat_template
    if not template:
        raise TemplateError(f"{config.name} has no chat template; set tokenizer.chat_template in the recipe")
    tokenizer.chat_template = template
    info = TokenizerInfo(
        # A bundled tokenizer is recorded by name: the manifest must not depend on the checkout.
        name=config.name, path=config.name if config.name in BUILTIN_TOKENIZERS else path,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        sha256=tokenizer_digest(tokenizer))
    return tokenizer, info


def tokenizer_location(info: dict[str, Any]) -> str:
    """Where to load the tokenizer a manifest's ``tokenizer`` entry names: a bundled one from
    this installation, otherwise its recorded local path or hub id."""
    builtin = BUILTIN_TOKENIZERS.get(info.get("name", ""))
    return str(builtin) if builtin else info.get("path") or info["name"]


def tokenizer_digest(tokenizer) -> str:
    """What manifest.json's ``tokenizer.sha256`` holds: vocabulary, merges and special tokens."""
    digest = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode())
    digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True).encode())
    return digest.hexdigest()


def resolve_template(value: str | None) -> str | None:
    """A template given inline, or the contents of the file it names.

    A value without Jinja syntax must name a file: a mistyped path would otherwise be taken for
    a template whose output holds no assistant turn, and every row would be quarantined.
    """
    if not value or "{%" in value or "{{" in value:
        return value
    if not Path(value).is_file():
        raise TemplateError(f"tokenizer.chat_template {value!r} is neither a Jinja template nor a file")
    return Path(value).read_text(encoding="utf-8")


@dataclass(frozen=True)
class RenderedChat:
    text: str
    assistant_spans: tuple[tuple[int, int], ...]  # [start, end) character ranges of targets
    # [start, end) ranges where message text spells a special token: encoded as text, not control
    # tokens (see longdata.control_tokens); empty for nearly every conversation.
    spelled_special: tuple[tuple[int, int], ...] = ()


class ChatRenderer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def _render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)

    def render(self, messages: Sequence[Message]) -> RenderedChat:
        turns = [{"role": m.role, "content": m.content} for m in messages]
        text = self._render(turns, add_generation_prompt=False)
        spans = []
        for index, message in enumerate(messages):
            if message.role != "assistant":
                continue
            start = len(self._prefix(turns[:index], text, add_generation_prompt=True))
            end = len(self._prefix(turns[: index + 1], text, add_generation_prompt=False))
            # Whitespace a template puts after the end-of-turn token is formatting, not a target.
            end = start + len(text[start:end].rstrip())
            if end > start:
                spans.append((start, end))
        return RenderedChat(text, tuple(spans))

    def _prefix(self, turns: list[dict[str, str]], full: str, add_generation_prompt: bool) -> str:
        prefix = self._render(turns, add_generation_prompt) if turns or add_generation_prompt else ""
        if not full.startswith(prefix):
            raise TemplateError(
                "the chat template renders a conversation prefix that is not a prefix of the whole "
                "conversation (it rewrites earlier turns), so assistant spans cannot be located; "
                "set tokenizer.chat_template to a prefix-stable template")
        return prefix


def template_overhead(tokenizer) -> int:
    """Tokens the chat template itself adds to the shortest trainable conversation (an empty
    user turn and a one-character answer): a row shorter than this holds no whole sample."""
    text = ChatRenderer(tokenizer).render((Message("user", ""), Message("assistant", "x"))).text
    return len(tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)) - 1


def _byte_level_alphabet() -> set[str]:
    """The 256 characters byte-level BPE vocabularies spell bytes with (GPT-2's mapping): printable
    Latin-1 bytes stand for themselves, the others are shifted to U+0100 and up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [256 + i for i in range(256 - len(printable))]
    return {chr(c) for c in printable + shifted}


class ByteLevelMasker:
    """The assistant mask from token ids alone, for byte-level BPE tokenizers.

    Offsets cost: ``encode_batch`` with offsets runs ~1.7x slower than ``encode_batch_fast`` and
    its Encoding objects take far longer to free. In a byte-level vocabulary every token is a fixed
    byte string, so the byte offsets of a sample are a cumulative sum of per-id byte lengths. That
    is exact when the token bytes add up to the text's UTF-8 bytes (no normaliser rewrote the
    text); ``mask`` checks exactly that and returns None otherwise, so the caller can fall back to
    real offsets. Tokens overlapping an assistant span are targets, as in ``assistant_mask``.
    """

    def __init__(self, token_bytes: np.ndarray, nfc: bool):
        self.token_bytes = token_bytes
        self.nfc = nfc  # the tokenizer NFC-normalises: exact only on text that already is NFC

    @classmethod
    def for_tokenizer(cls, tokenizer) -> ByteLevelMasker | None:
        """A masker when the tokenizer is byte-level BPE (GPT-2, Llama 3, Qwen 2 style), else None."""
        spec = json.loads(tokenizer.backend_tokenizer.to_str())
        normalizer = (spec.get("normalizer") or {}).get("type")
        if (spec["model"].get("type") != "BPE" or spec["model"].get("byte_fallback")
                or (spec.get("decoder") or {}).get("type") != "ByteLevel" or normalizer not in (None, "NFC")):
            return None
        alphabet = _byte_level_alphabet()
        vocab = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=False)
        if any(not alphabet.issuperset(token) for token in vocab):
            return None
        token_bytes = np.zeros(tokenizer.backend_tokenizer.get_vocab_size(with_added_tokens=True), dtype=np.int64)
        for token, token_id in vocab.items():
            token_bytes[token_id] = len(token)  # one alphabet character per byte
        for token_id, added in tokenizer.backend_tokenizer.get_added_tokens_decoder().items():
            token_bytes[token_id] = len(added.content.encode("utf-8"))  # matched on the raw text
        return cls(token_bytes, nfc=normalizer == "NFC")

    def mask(self, ids: np.ndarray, text: str, spans: Sequence[tuple[int, int]]) -> np.ndarray | None:
        if self.nfc and not unicodedata.is_normalized("NFC", text):
            return None
        ends = np.cumsum(self.token_bytes[ids])
        if not len(ends) or ends[-1] != len(text.encode("utf-8", "surrogatepass")):
            return None
        mask = np.zeros(len(ids), dtype=np.uint8)
        for start, end in spans:
            byte_start = len(text[:start].encode("utf-8", "surrogatepass"))
            byte_end = len(text[:end].encode("utf-8", "surrogatepass"))
            first = int(np.searchsorted(ends, byte_start, side="right"))
            last = int(np.searchsorted(ends, byte_end - 1, side="right"))
            mask[first : last + 1] = 1
        mask[:1] = 0  # the first token of a sample is never a target (nothing precedes it)
        return mask


def assistant_mask(encoding, spans: Sequence[tuple[int, int]], n_tokens: int) -> np.ndarray:
    """1 for every token that overlaps an assistant span, from a ``tokenizers.Encoding``."""
    mask = np.zeros(n_tokens, dtype=np.uint8)
    for start, end in spans:
        first = _token_near(encoding, start, end, step=1)
        last = _token_near(encoding, end - 1, start - 1, step=-1)
        if first is not None and last is not None and last >= first:
            mask[first : last + 1] = 1
    mask[:1] = 0  # the first token of a sample is never a target (nothing precedes it)
    return mask


def _token_near(encoding, position: int, stop: int, step: int) -> int | None:
    """The token covering ``position``, or the nearest one toward ``stop`` (offsets may skip
    characters a normaliser or trimming dropped)."""
    for char in range(position, stop, step):
        token = encoding.char_to_token(char)
        if token is not None:
            return token
    return None
