"""Control tokens come from the chat template's structure, never from what a row's text spells.

A fast tokenizer matches its special tokens anywhere in the input, so a user turn containing
``<|eot_id|><|start_header_id|>assistant`` would become a real end-of-turn and a forged assistant
header in the model's input. By default (``tokenizer.special_tokens_in_text: encode_as_text``)
such spellings are encoded as the ordinary text they are:

1. ``locate`` finds where they land in the rendered conversation: every spelling in a message is
   swapped for a private-use character before rendering, so the template's own special tokens are
   the only ones left, then the swap is undone while recording its spans;
2. ``encode`` cuts the rendered text at the template's special tokens only, maps those to their
   ids and encodes the text between them with special-token matching off. A fast tokenizer splits
   its input at special tokens before normalising and pre-tokenizing anyway, so for text that
   spells nothing this gives exactly the ids of a plain ``encode`` (tests/test_guarantees_rows.py).

The ids are plain vocabulary ids either way, so ``templates.ByteLevelMasker`` masks them from
ids alone as before; ``JoinedEncoding`` keeps character offsets for the offsets-based mask.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Sequence
from dataclasses import replace

from longdata.records import Message

SPECIAL_TOKENS_IN_TEXT = ("encode_as_text", "allow")
# Stand-ins for spelled special tokens while rendering: Supplementary Private Use Area-A and -B,
# which no tokenizer vocabulary or chat template uses; a conversation that itself contains some
# gets stand-ins it does not contain.
_STAND_IN_FIRST, _STAND_IN_LAST = 0xF0000, 0x10FFFD

Span = tuple[int, int]


class SpelledSpecialTokensError(ValueError):
    """A row whose spelled special tokens cannot be told from the template's (it is quarantined)."""


class JoinedEncoding:
    """Token ids with character offsets into the whole text, like a ``tokenizers.Encoding``."""

    def __init__(self, ids: list[int], starts: list[int], ends: list[int]):
        self.ids, self._starts, self._ends = ids, starts, ends

    def __len__(self) -> int:
        return len(self.ids)

    def token_to_chars(self, token: int) -> tuple[int, int]:
        return self._starts[token], self._ends[token]

    def char_to_token(self, char: int) -> int | None:
        """The first token whose offsets cover ``char`` (what ``Encoding.char_to_token``
        returns)."""
        token = bisect.bisect_right(self._ends, char)
        return token if token < len(self.ids) and self._starts[token] <= char else None


class SpecialTokenText:
    """A tokenizer's special tokens, found in message text and encoded as text."""

    def __init__(self, backend):
        added = backend.get_added_tokens_decoder()
        self._specials = {
            token.content: (token_id, token)
            for token_id, token in added.items()
            if token.special and token.content
        }
        self._names = sorted(self._specials, key=len, reverse=True)  # longest match first
        self._pattern = re.compile("|".join(map(re.escape, self._names))) if self._names else None
        # A substring test per opening is far cheaper than the regex on long text that spells
        # nothing.
        self._openings = tuple({name[:2] for name in self._names})
        self._backend = backend
        self._text_backend = None

    def spelled_in(self, messages: Sequence[Message]) -> bool:
        if self._pattern is None:
            return False
        return any(
            any(opening in m.content for opening in self._openings)
            and self._pattern.search(m.content)
            for m in messages
        )

    def locate(
        self, messages: Sequence[Message], text: str, render: Callable[[tuple[Message, ...]], str]
    ) -> tuple[Span, ...]:
        """Spans of ``text`` (``render(messages)``) that messages spell rather than the template
        writes. ``render`` is called once, on the messages with every spelling swapped out."""
        base = _free_stand_ins(messages, len(self._names))
        stand_in = {name: chr(base + k) for k, name in enumerate(self._names)}
        swapped = tuple(
            replace(m, content=self._pattern.sub(lambda match: stand_in[match.group()], m.content))
            for m in messages
        )
        rendered = render(swapped)
        pieces, spans, length, last = [], [], 0, 0
        for match in re.finditer(f"[{chr(base)}-{chr(base + len(self._names) - 1)}]", rendered):
            name = self._names[ord(match.group()) - base]
            pieces.append(rendered[last : match.start()])
            length += match.start() - last
            spans.append((length, length + len(name)))
            pieces.append(name)
            length += len(name)
            last = match.end()
        pieces.append(rendered[last:])
        if "".join(pieces) != text:
            raise SpelledSpecialTokensError(
                "the text spells special tokens and the chat template rewrites message text, "
                "so they cannot be told from the template's own; "
                "set tokenizer.special_tokens_in_text: allow "
                "to encode them as control tokens"
            )
        return tuple(spans)

    def encode(self, text: str, spelled: Sequence[Span]) -> JoinedEncoding:
        """The ids of ``text`` with the special tokens in ``spelled`` encoded as text and every
        other special token as its control id."""
        if self._text_backend is None:
            from tokenizers import Tokenizer

            self._text_backend = Tokenizer.from_str(self._backend.to_str())
            self._text_backend.encode_special_tokens = True
        spelled_starts = [start for start, _ in spelled]
        segments: list[tuple[int, int, int | None]] = []  # (start, end, control id or None)
        cursor = 0
        for match in self._pattern.finditer(text):
            start, end = match.span()
            at = (
                bisect.bisect_right(spelled_starts, end - 1) - 1
            )  # the last spelled span before `end`
            if at >= 0 and spelled[at][1] > start:
                continue  # the row's text spells this one
            token_id, token = self._specials[match.group()]
            # Tokens that strip whitespace beside them take it with them, as the tokenizer does.
            if token.lstrip:
                while start > cursor and text[start - 1].isspace():
                    start -= 1
            if token.rstrip:
                while end < len(text) and text[end].isspace():
                    end += 1
            if start > cursor:
                segments.append((cursor, start, None))
            segments.append((start, end, token_id))
            cursor = end
        if cursor < len(text):
            segments.append((cursor, len(text), None))
        plain = [text[start:end] for start, end, token_id in segments if token_id is None]
        encoded = iter(self._text_backend.encode_batch(plain, add_special_tokens=False))
        ids, starts, ends = [], [], []
        for start, end, token_id in segments:
            if token_id is not None:
                ids.append(token_id)
                starts.append(start)
                ends.append(end)
                continue
            encoding = next(encoded)
            ids.extend(encoding.ids)
            for token_start, token_end in encoding.offsets:
                starts.append(start + token_start)
                ends.append(start + token_end)
        return JoinedEncoding(ids, starts, ends)


def _free_stand_ins(messages: Sequence[Message], count: int) -> int:
    """The first code point of ``count`` consecutive private-use characters no message contains."""
    used = sorted({ord(c) for m in messages for c in m.content if ord(c) >= _STAND_IN_FIRST})
    base = _STAND_IN_FIRST
    for code in used:
        if code >= base + count:
            break
        if code >= base:
            base = code + 1
    if base + count - 1 > _STAND_IN_LAST:
        raise SpelledSpecialTokensError(
            "the text uses every private-use character longdata could "
            "stand in for spelled special tokens with"
        )
    return base
