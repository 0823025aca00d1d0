"""Row parsers: one public schema each, turning a raw JSON object into messages.

Message text is kept as written: a template renders whitespace as it is given (Qwen3's does not
trim), so changing it here would train targets the template never renders at inference. A source
with ``strip_messages: true`` asks for CRLF line ends and edge whitespace to be normalised.

A parser raises ``RowError`` with a reason a person can act on; the reader quarantines the row.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from longdata.records import ROLES, Message, RowError, validate_messages

SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
}


def _text(value: Any, field: str, strip: bool) -> str:
    if not isinstance(value, str):
        raise RowError(f"{field} must be a string, got {type(value).__name__}")
    return value.replace("\r\n", "\n").strip() if strip else value


def _turns(value: Any, field: str) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise RowError(f"{field} must be a list, got {type(value).__name__}")
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise RowError(f"{field}[{i}] must be an object, got {type(turn).__name__}")
    return value


def _object(row: Any) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise RowError(f"row must be a JSON object, got {type(row).__name__}")
    return row


def parse_messages(row: Any, strip: bool = False) -> tuple[Message, ...]:
    """``{"messages": [{"role": "user"|"assistant"|"system", "content": str}, ...]}``
    (LongAlign)."""
    turns = _turns(_object(row).get("messages"), "messages")
    messages = []
    for i, turn in enumerate(turns):
        role = turn.get("role")
        if role not in ROLES:
            raise RowError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        messages.append(Message(role, _text(turn.get("content"), f"messages[{i}].content", strip)))
    messages = tuple(messages)
    validate_messages(messages)
    return messages


def parse_sharegpt(row: Any, strip: bool = False) -> tuple[Message, ...]:
    """``{"conversations": [{"from": "human"|"gpt"|"system", "value": str}, ...]}``."""
    turns = _turns(_object(row).get("conversations"), "conversations")
    messages = []
    for i, turn in enumerate(turns):
        speaker = turn.get("from")
        if speaker not in SHAREGPT_ROLES:
            raise RowError(
                f"conversations[{i}].from must be one of "
                f"{', '.join(sorted(SHAREGPT_ROLES))}, got {speaker!r}"
            )
        messages.append(
            Message(
                SHAREGPT_ROLES[speaker],
                _text(turn.get("value"), f"conversations[{i}].value", strip),
            )
        )
    messages = tuple(messages)
    validate_messages(messages)
    return messages


def parse_alpaca(row: Any, strip: bool = False) -> tuple[Message, ...]:
    """``{"instruction": str, "input": str|null, "output": str}`` (LongAlpaca: the document is in
    ``instruction``; a non-empty ``input`` is appended to the user turn)."""
    row = _object(row)
    instruction = _text(row.get("instruction"), "instruction", strip)
    extra = row.get("input")
    extra = "" if extra is None else _text(extra, "input", strip)
    prompt = f"{instruction}\n\n{extra}" if extra else instruction
    if not prompt:
        raise RowError("instruction and input are both empty")
    answer = _text(row.get("output"), "output", strip)
    messages = (Message("user", prompt), Message("assistant", answer))
    validate_messages(messages)
    return messages


PARSERS: dict[str, Callable[[Any, bool], tuple[Message, ...]]] = {
    "messages": parse_messages,
    "sharegpt": parse_sharegpt,
    "alpaca": parse_alpaca,
}
