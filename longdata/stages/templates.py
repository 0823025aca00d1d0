"""Chat template rendering and the assistant-only loss mask, for any template.

``apply_chat_template(..., return_assistant_tokens_mask=True)`` only works for templates with
``{% generation %}`` tags and silently returns zeros for the rest (Llama 3.1's among them). So the
mask is built from character offsets instead: an assistant turn spans from the end of the
conversation rendered up to it *with* the generation prompt to the end of the conversation
rendered *including* it. Tokens overlapping such a span are targets; this covers the assistant's
text and its end-of-turn token and nothing the user or system wrote.

Some templates rewrite earlier turns (Qwen3 drops the ``<think>`` block of every assistant turn
before the last user turn), so a rendered prefix is not a prefix of the whole conversation. An
assistant turn's target is always what the template renders for it when the conversation ends
there, which is what the model produces at inference; ``ChatRenderer.samples`` turns such a
conversation into one sample per assistant turn (docs/TEMPLATES.md).
"""

from __future__ import annotations

import json
import signal
import threading
import unicodedata
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from longdata.format.manifest import TokenizerEntry
from longdata.format.remote_code import refuse_remote_code
from longdata.format.tokenizer import (  # noqa: F401 - also imported from here
    BUILTIN_TOKENIZERS,
    DIGEST_VERSION,
    TemplateError,
    bind_template_kwargs,
    resolve_template,
    tokenizer_digest,
)
from longdata.recipe import TokenizerConfig
from longdata.records import Message, RowError

# A chat template renders even a long-context conversation in milliseconds; one that runs for
# seconds loops without end (nested loops over ranges), and would hang validate and the build.
RENDER_SECONDS = 2.0


class TemplateTooSlow(TemplateError):
    """The chat template did not finish rendering one conversation within ``RENDER_SECONDS``."""


def _expire(signum, frame):
    raise TemplateTooSlow(
        f"the chat template took over {RENDER_SECONDS:g} s to render one conversation (a loop "
        "that does not end?): fix tokenizer.chat_template"
    )


_bound_armed = False  # the outermost bounded call arms the timer; the renders inside it share it


@contextmanager
def _render_bounded() -> Iterator[None]:
    """Raise ``TemplateTooSlow`` in the rendering code once ``RENDER_SECONDS`` have passed.

    A Jinja template runs as Python bytecode, so a timer signal interrupts it between any two
    steps. Signals reach only the main thread, where validate, the build's tokenize stage and its
    worker processes render; elsewhere the render is unbounded. On the tokenize hot path the
    timer is armed once per conversation, not per render, and the handler is installed once:
    installing it costs four times the timer calls.
    """
    global _bound_armed
    if _bound_armed or threading.current_thread() is not threading.main_thread():
        yield
        return
    if signal.getsignal(signal.SIGALRM) is not _expire:
        signal.signal(signal.SIGALRM, _expire)
    _bound_armed = True
    signal.setitimer(signal.ITIMER_REAL, RENDER_SECONDS)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        _bound_armed = False


class NotPrefixStable(TemplateError):
    """This conversation's earlier turns render differently once later turns follow."""


class TurnStartHidden(RowError):
    """The template renders an assistant turn so that its generation prompt is not a prefix of it
    (Qwen3 with ``enable_thinking: false`` on a turn that carries reasoning): the model is never
    prompted to write that turn, so it cannot be a target."""


def load_tokenizer(config: TokenizerConfig, require_chat_template: bool = True):
    """The fast tokenizer named by the recipe, and facts about it for the manifest and cache keys.
    A recipe of ``kind: text`` sources only needs no chat template (a base model has none)."""
    path = str(BUILTIN_TOKENIZERS.get(config.name, config.name))
    refuse_remote_code(path)
    if _names_generic_fast_class(Path(path)):
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast.from_pretrained(path, revision=config.revision)
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(
            path, revision=config.revision, use_fast=True, trust_remote_code=False
        )
    if not tokenizer.is_fast:
        raise TemplateError(f"{config.name}: a fast (Rust) tokenizer is required for offsets")
    template = resolve_template(config.chat_template) or tokenizer.chat_template
    if not template and require_chat_template:
        raise TemplateError(
            f"{config.name} has no chat template; set tokenizer.chat_template in the recipe"
        )
    if template:  # a text-only recipe may use a tokenizer without one
        tokenizer.chat_template = bind_template_kwargs(template, config.chat_template_kwargs)
    info = TokenizerEntry(
        # A bundled tokenizer is recorded by name: the manifest must not depend on the checkout.
        name=config.name,
        path=config.name if config.name in BUILTIN_TOKENIZERS else path,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        sha256=tokenizer_digest(tokenizer),
        digest_version=DIGEST_VERSION,
        revision=config.revision,
        # The template as bound: what a consumer of the build renders with, as the build did.
        chat_template=tokenizer.chat_template,
    )
    return tokenizer, info


def _names_generic_fast_class(directory: Path) -> bool:
    """Whether ``directory`` is a tokenizer alone (no model ``config.json``) whose
    tokenizer_config names ``PreTrainedTokenizerFast``: the class AutoTokenizer loads it with
    then, under transformers 4.57 and 5.x alike. Loading that class directly saves importing
    AutoTokenizer, which under 5.x imports torch through transformers' model configs: seconds of
    every build's start for nothing a build uses (4.x imports torch from the tokenizer module
    itself, so there it saves nothing and costs nothing)."""
    config = directory / "tokenizer_config.json"
    if not config.is_file() or (directory / "config.json").exists():
        return False
    try:
        declared = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False  # AutoTokenizer reports an unreadable config in its own words
    return (
        isinstance(declared, dict) and declared.get("tokenizer_class") == "PreTrainedTokenizerFast"
    )


@dataclass(frozen=True)
class RenderedChat:
    """One sample's text and where its targets are. A record without a template (raw text,
    every token a target) is ``RenderedChat(text, ((0, len(text)),))``."""

    text: str
    assistant_spans: tuple[tuple[int, int], ...]  # [start, end) character ranges of targets
    # [start, end) characters of the longest user turn's content: what truncate_middle may cut.
    user_span: tuple[int, int] | None = None
    # [start, end) ranges where message text spells a special token: encoded as text, not control
    # tokens (see longdata.stages.control_tokens); empty for nearly every conversation.
    spelled_special: tuple[tuple[int, int], ...] = ()


class ChatRenderer:
    def __init__(self, tokenizer, multi_turn: str = "auto"):
        self.tokenizer = tokenizer
        self.multi_turn = multi_turn

    @_render_bounded()
    def _render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> str:
        if not messages:
            return self._render_empty_history(add_generation_prompt)
        return self.tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _render_empty_history(self, add_generation_prompt: bool) -> str:
        """The template over no messages: an assistant-first conversation's first target starts
        after this generation prompt. transformers 5's apply_chat_template refuses an empty
        conversation while 4.x renders it, so call the Jinja renderer both share, with the
        template variables apply_chat_template passes (the special tokens)."""
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, _ = render_jinja_template(
            conversations=[[]],
            chat_template=self.tokenizer.get_chat_template(),
            add_generation_prompt=add_generation_prompt,
            **self.tokenizer.special_tokens_map,
        )
        return rendered[0]

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
        return RenderedChat(text, tuple(spans), _longest_user_span(text, messages))

    @_render_bounded()
    def samples(self, messages: Sequence[Message]) -> list[RenderedChat]:
        """The samples one conversation becomes under the ``multi_turn`` policy (see
        docs/TEMPLATES.md): under ``auto`` one sample when the template renders the conversation
        prefix-stably, else one per assistant turn (``per_turn``); ``last_turn`` trains only the
        final assistant turn. Every target is the turn as rendered when the conversation ends
        there, so no policy trains a form the template would not produce at inference; a turn the
        model is never prompted to write (``TurnStartHidden``) is left out, the conversation's
        other turns kept, and only a conversation with no other turn raises."""
        assistant = [i for i, m in enumerate(messages) if m.role == "assistant"]
        if self.multi_turn == "last_turn":
            return [self.render_turn(messages, assistant[-1])]
        if self.multi_turn == "auto":
            try:
                return [self.render(messages)]
            except NotPrefixStable:
                pass
        per_turn, hidden = [], None
        for index in assistant:
            try:
                per_turn.append(self.render_turn(messages, index))
            except TurnStartHidden as exc:
                hidden = exc  # that turn alone: the conversation's other turns are still samples
        if not per_turn:
            raise hidden
        # A turn whose target renders empty teaches nothing; keep one sample so that a
        # conversation left with no target at all is still reported.
        return [chat for chat in per_turn if chat.assistant_spans] or per_turn[-1:]

    def render_turn(self, messages: Sequence[Message], index: int) -> RenderedChat:
        """The conversation up to assistant turn ``index``, ending there, that turn the only
        target."""
        turns = [{"role": m.role, "content": m.content} for m in messages[: index + 1]]
        prompt = self.generation_prompt(messages[:index])
        text = self._render(turns, add_generation_prompt=False)
        if not text.startswith(prompt):
            raise TurnStartHidden(
                f"the chat template renders the assistant turn (message {index}) so that the "
                "generation prompt is not a prefix of it: cannot tell where the answer starts"
            )
        end = len(prompt) + len(text[len(prompt) :].rstrip())
        spans = ((len(prompt), end),) if end > len(prompt) else ()
        return RenderedChat(text, spans, _longest_user_span(text, messages[: index + 1]))

    def generation_prompt(self, messages: Sequence[Message]) -> str:
        """What the model reads before it writes the next assistant turn (the inference prompt)."""
        return self._render(
            [{"role": m.role, "content": m.content} for m in messages], add_generation_prompt=True
        )

    def _prefix(self, turns: list[dict[str, str]], full: str, add_generation_prompt: bool) -> str:
        prefix = (
            self._render(turns, add_generation_prompt) if turns or add_generation_prompt else ""
        )
        if not full.startswith(prefix):
            raise NotPrefixStable(
                "the chat template renders a conversation prefix that is not a prefix of the whole "
                "conversation (it rewrites earlier turns), so this conversation cannot be one "
                "sample; "
                "ChatRenderer.samples renders it one assistant turn at a time"
            )
        return prefix


def _longest_user_span(text: str, messages: Sequence[Message]) -> tuple[int, int] | None:
    """Where the longest user turn's content lies in ``text``, or None if it is not there verbatim.

    Message contents appear in ``text`` in conversation order; each is looked for after the
    previous one found. A template may trim content (Llama 3.1) or rewrite it (Qwen3's earlier
    assistant turns), so contents are matched stripped and a missing one is skipped.
    """
    position, found = 0, {}
    for index, message in enumerate(messages):
        content = message.content.strip()
        at = text.find(content, position) if content else -1
        if at >= 0:
            found[index] = (at, at + len(content))
            position = at + len(content)
    users = [found[i] for i, m in enumerate(messages) if m.role == "user" and i in found]
    return max(users, key=lambda span: span[1] - span[0]) if users else None


def template_overhead(tokenizer) -> int:
    """Tokens the chat template itself adds to the shortest trainable conversation (an empty
    user turn and a one-character answer): a row shorter than this holds no whole sample.
    Computed before any row is read, so a template that cannot render at all (a syntax error, a
    sandbox refusal, an undefined name) fails here as one TemplateError line."""
    import jinja2

    try:
        text = ChatRenderer(tokenizer).render((Message("user", ""), Message("assistant", "x"))).text
    except jinja2.TemplateError as error:
        raise TemplateError(
            f"the chat template cannot render a one-turn conversation "
            f"({type(error).__name__}: {error})"
        ) from None
    return len(tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)) - 1


def _byte_level_alphabet() -> set[str]:
    """The 256 characters byte-level BPE vocabularies spell bytes with (GPT-2's mapping): printable
    Latin-1 bytes stand for themselves, the others are shifted to U+0100 and up."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
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
        """A masker when the tokenizer is byte-level BPE (GPT-2, Llama 3, Qwen 2 style), else
        None."""
        spec = json.loads(tokenizer.backend_tokenizer.to_str())
        normalizer = (spec.get("normalizer") or {}).get("type")
        if (
            spec["model"].get("type") != "BPE"
            or spec["model"].get("byte_fallback")
            or (spec.get("decoder") or {}).get("type") != "ByteLevel"
            or normalizer not in (None, "NFC")
        ):
            return None
        alphabet = _byte_level_alphabet()
        vocab = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=False)
        if any(not alphabet.issuperset(token) for token in vocab):
            return None
        token_bytes = np.zeros(
            tokenizer.backend_tokenizer.get_vocab_size(with_added_tokens=True), dtype=np.int64
        )
        for token, token_id in vocab.items():
            token_bytes[token_id] = len(token)  # one alphabet character per byte
        for token_id, added in tokenizer.backend_tokenizer.get_added_tokens_decoder().items():
            token_bytes[token_id] = len(added.content.encode("utf-8"))  # matched on the raw text
        return cls(token_bytes, nfc=normalizer == "NFC")

    def token_ends(self, ids: np.ndarray, text: str) -> np.ndarray | None:
        """The UTF-8 byte offset where each token ends, or None when the tokens do not spell
        ``text`` byte for byte (a normaliser rewrote it)."""
        if self.nfc and not unicodedata.is_normalized("NFC", text):
            return None
        ends = np.cumsum(self.token_bytes[ids])
        if not len(ends) or ends[-1] != len(text.encode("utf-8", "surrogatepass")):
            return None
        return ends

    def mask(
        self, ids: np.ndarray, text: str, spans: Sequence[tuple[int, int]]
    ) -> np.ndarray | None:
        ends = self.token_ends(ids, text)
        return None if ends is None else self.mask_from_ends(ends, text, spans)

    @staticmethod
    def mask_from_ends(ends: np.ndarray, text: str, spans: Sequence[tuple[int, int]]) -> np.ndarray:
        mask = np.zeros(len(ends), dtype=np.uint8)
        for start, end in spans:
            first = int(np.searchsorted(ends, _byte_offset(text, start), side="right"))
            last = int(np.searchsorted(ends, _byte_offset(text, end) - 1, side="right"))
            mask[first : last + 1] = 1
        mask[:1] = 0  # the first token of a sample is never a target (nothing precedes it)
        return mask

    def inner_tokens(
        self, ids: np.ndarray, ends: np.ndarray, text: str, span: tuple[int, int]
    ) -> tuple[int, int]:
        """[first, last) of the tokens lying wholly inside the character ``span``."""
        starts = ends - self.token_bytes[ids]
        first = int(np.searchsorted(starts, _byte_offset(text, span[0]), side="left"))
        last = int(np.searchsorted(ends, _byte_offset(text, span[1]), side="right"))
        return (first, last) if last > first else (0, 0)


def _byte_offset(text: str, char: int) -> int:
    return len(text[:char].encode("utf-8", "surrogatepass"))


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


def inner_tokens(encoding, span: tuple[int, int]) -> tuple[int, int]:
    """[first, last) of the tokens lying wholly inside the character ``span``, from offsets."""
    start, end = span
    first = _token_near(encoding, start, end, step=1)
    last = _token_near(encoding, end - 1, start - 1, step=-1)
    if first is None or last is None:
        return 0, 0
    first += encoding.token_to_chars(first)[0] < start
    last -= encoding.token_to_chars(last)[1] > end
    return (first, last + 1) if last >= first else (0, 0)


def _token_near(encoding, position: int, stop: int, step: int) -> int | None:
    """The token covering ``position``, or the nearest one toward ``stop`` (offsets may skip
    characters a normaliser or trimming dropped)."""
    for char in range(position, stop, step):
        token = encoding.char_to_token(char)
        if token is not None:
            return token
    return None
