"""The normalised records every source yields, and the quarantine record for rows it cannot use.

Sources produce ``Conversation``, ``Document`` or ``Quarantined`` values; nothing downstream
ever sees a source's raw schema.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")


@dataclass(frozen=True, slots=True)
class Message:
    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class Conversation:
    """One training sample: an ordered chat with at least one assistant turn.

    ``location`` says where the row came from (``file:line`` or ``dataset[index]``) so that every
    count in the manifest can be traced back to input rows; ``position`` is the row's ordinal in
    its source, which orders samples identically however a build is partitioned; ``file`` is the
    source file it came from (its path inside the source), for the per-file row accounting.
    """

    messages: tuple[Message, ...]
    location: str
    meta: dict[str, str] = field(default_factory=dict)
    position: int = 0
    file: str = ""


@dataclass(frozen=True, slots=True)
class Document:
    """One raw document for continued pretraining (a ``kind: text`` source): no chat template,
    every token a target. ``location`` and ``position`` mean what they do for a Conversation."""

    text: str
    location: str
    meta: dict[str, str] = field(default_factory=dict)
    position: int = 0
    file: str = ""  # the source file it came from, for the per-file row accounting


@dataclass(frozen=True, slots=True)
class Quarantined:
    """A source row that could not be normalised, kept with the reason instead of being dropped."""

    location: str
    reason: str
    raw: str
    file: str = ""


class RowError(ValueError):
    """Raised by a schema parser when a row is malformed; the message becomes the quarantine
    reason."""


EMPTY_CONVERSATION = "empty conversation"


def validate_messages(messages: tuple[Message, ...]) -> None:
    """Reject conversations no trainer can learn from: empty, or without any assistant text."""
    if not messages:
        raise RowError(EMPTY_CONVERSATION)
    # Text is kept as written, so an answer of only whitespace is possible; it teaches nothing.
    if not any(m.role == "assistant" and m.content.strip() for m in messages):
        raise RowError("no assistant turn with content")
