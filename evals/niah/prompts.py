"""Needle-in-a-haystack prompts: a grid of context lengths x depths.

Every prompt is one anti-haystack needle task (``longdata.sources.antihaystack.NeedleTask``):
one fact "The secret code of the <subject> is <code>." planted in synthetic filler at a
requested relative depth, followed by the question. Unlike training items, whose lengths and
depths are drawn at random, each grid cell fixes both:

- **context length** = the number of tokens of the whole prompt the model reads: the chat
  template's tokens (BOS, headers, any default system text), the haystack with the needle, the
  question, and the generation prompt that opens the answer. The filler is grown or cut sentence
  by sentence until ``length - tolerance <= tokens <= length`` (see ``length_slack``), so a
  "128K" prompt never exceeds 131,072 tokens.
- **depth** = where the needle starts in the haystack, as a fraction of the haystack's
  characters (0 = first sentence, 1 = after the last one). The needle goes to the sentence
  boundary nearest the requested depth; the measured depth is reported beside it.

Held-out seeds: every random choice here comes from ``random.Random`` keyed by strings under
``EVAL_NAMESPACE`` (``"longdata-eval-niah:<seed>:..."``). Recipes' anti-haystack sources key
theirs as ``"<seed>:<index>"`` with an integer seed (the recipe schema accepts only integers),
so no recipe can reproduce an eval prompt or its needle by accident.

Prompt and answer are rendered by the function training uses (``ChatRenderer``, with the
recipe's ``chat_template_kwargs`` bound into the template): the prompt is the conversation's
generation prompt, and the scored answer is the target training would learn for it, with the
template's text around the needle sentence (Qwen3's empty ``<think>`` block without
``enable_thinking: false``, the end-of-turn token). So ``prompt_ids + answer_ids`` are the
tokens of the training sample [user: prompt, assistant: needle sentence].

Sample ``s`` of a grid uses the same needle (subject and code) and the same filler stream in
every cell, as the classic test does, so cells differ only in length and depth. The filler is
generated prose, or with ``haystack`` (an ``antihaystack.Haystack``: essays, books, code) the
haystack's own sentences from a start drawn from the same key.
``build_controls`` gives each sample's question over its filler with no needle: the control
that tells retrieval from a model's prior over codes.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from longdata.records import Message
from longdata.sources import antihaystack, synthetic
from longdata.sources.antihaystack import Haystack, NeedleTask, Rendered, SyntheticFiller
from longdata.sources.synthetic import Lang
from longdata.stages.templates import ChatRenderer

EVAL_NAMESPACE = "longdata-eval-niah"
CODE_RANGE = (1_000, 1_000_000)  # as in training items: 4- to 6-digit codes
LENGTH_TOLERANCE = 0.01  # a prompt may fall this fraction short of its length ...
MIN_SLACK_TOKENS = 24  # ... or this many tokens, whichever is more (about one sentence)
MAX_FIT_ROUNDS = 12
ANSWER_SENTINEL = "LONGDATA_ANSWER_SENTINEL"


def length_slack(length: int) -> int:
    """How many tokens a prompt for ``length`` may fall short of it."""
    return max(round(LENGTH_TOLERANCE * length), MIN_SLACK_TOKENS)


def fit_prompt(task, filler, length: int, chars_per_token: float, templated_ids: Callable):
    """`task` over `filler` grown or cut until its templated prompt has between
    `length - length_slack(length)` and `length` tokens (never more: a "128K" prompt must fit a
    128K context). Shared by the NIAH and RULER evals."""
    rendered, _ = antihaystack.fit(
        task,
        filler,
        target_tokens=length,
        chars_per_token=chars_per_token,
        measure=lambda r: len(templated_ids(r)),
        window=(length - length_slack(length), length),
        limit=length,
        max_rounds=MAX_FIT_ROUNDS,
    )
    return rendered


@dataclass(frozen=True)
class NiahPrompt:
    """One cell sample of the grid, tokenized and ready for a model."""

    length: int  # requested context length in tokens
    depth: float  # requested needle depth in [0, 1]
    sample: int  # sample number within the cell
    key: str  # the RNG key of this sample's needle and filler (reproducibility)
    lang: Lang
    prompt_ids: tuple[int, ...] = field(repr=False)
    measured_depth: float | None  # None in a control prompt
    subject: str
    code: int
    question: str
    answer: str  # the reference answer: the needle sentence itself
    distractor_codes: tuple[int, ...]  # other codes, as many digits and answer tokens (loglik)
    distractors: tuple[str, ...]  # the answer sentence with each distractor code
    planted: bool = True  # False: a control prompt without the needle
    # The answer and each distractor as the training target renders them (see the module doc).
    answer_ids: tuple[int, ...] = field(default=(), repr=False)
    distractor_ids: tuple[tuple[int, ...], ...] = field(default=(), repr=False)

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def expected(self) -> tuple[str, ...]:
        """The codes a correct answer must contain."""
        return (str(self.code),)


def parse_lengths(text: str) -> list[int]:
    """``"4k,8k,16K,1500"`` -> ``[4096, 8192, 16384, 1500]``: k = 1024 tokens, m = 1024k."""
    lengths = []
    for part in _parts(text):
        match = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmM]?)", part)
        if not match:
            raise ValueError(f"bad length {part!r}: use a token count like 4096, 4k or 128K")
        scale = {"": 1, "k": 1024, "m": 1024 * 1024}[match[2].lower()]
        value = float(match[1]) * scale
        if value != int(value) or value < 1:
            raise ValueError(f"bad length {part!r}: not a whole number of tokens")
        lengths.append(int(value))
    if len(set(lengths)) != len(lengths):
        raise ValueError(f"lengths repeat: {text!r}")
    return sorted(lengths)


def parse_depths(text: str) -> list[float]:
    """``"0,0.25,50%"`` -> ``[0.0, 0.25, 0.5]``; each in [0, 1]."""
    depths = []
    for part in _parts(text):
        try:
            value = float(part[:-1]) / 100 if part.endswith("%") else float(part)
        except ValueError:
            raise ValueError(f"bad depth {part!r}: use a fraction like 0.25 or 25%") from None
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"depth {part!r} is outside [0, 1]")
        depths.append(value)
    if len(set(depths)) != len(depths):
        raise ValueError(f"depths repeat: {text!r}")
    return sorted(depths)


def _parts(text: str) -> list[str]:
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts:
        raise ValueError("empty list")
    return parts


def generation_prompt(tokenizer: Any, user_text: str) -> str:
    """The chat-templated text of one user turn followed by the generation prompt, exactly the
    prompt part of the training sample [user, assistant]. A template that ignores
    ``add_generation_prompt`` trains its assistant header as part of the target, so the
    prompt ends before it and the scored answer starts with it."""
    return ChatRenderer(tokenizer).generation_prompt([Message("user", user_text)])


def answer_frame(tokenizer: Any, user_text: str) -> tuple[str, str]:
    """(before, after): the template's text around an answer in the target training renders for
    [user: ``user_text``, assistant: answer], e.g. ``("<think>\n\n</think>\n\n", "<|im_end|>")``.
    Found with a placeholder answer, so it holds for templates that insert content verbatim."""
    messages = (Message("user", user_text), Message("assistant", ANSWER_SENTINEL))
    chat = ChatRenderer(tokenizer).render_turn(messages, 1)
    start, end = chat.assistant_spans[0] if chat.assistant_spans else (0, 0)
    before, found, after = chat.text[start:end].partition(ANSWER_SENTINEL)
    if not found:
        raise ValueError(
            "the chat template does not render the assistant's answer verbatim after the "
            "generation prompt; cannot tell where the answer starts"
        )
    return before, after


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of already-templated text (the template wrote any BOS itself)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def eval_needle(seed: int, sample: int, lang: Lang) -> tuple[str, int]:
    """The (subject, code) of grid sample ``sample``: the same in every cell."""
    rng = random.Random(f"{EVAL_NAMESPACE}:{seed}:needle:{sample}:{lang}")
    return synthetic.marker_phrase(rng, lang), rng.randrange(*CODE_RANGE)


def distractor_codes(
    seed: int,
    sample: int,
    lang: Lang,
    code: int,
    count: int,
    accept: Callable[[int], bool] | None = None,
) -> list[int]:
    """``count`` distinct codes with as many digits as ``code``, none equal to it.

    ``accept`` narrows the choice further (``build_prompt`` asks for answers of as many tokens
    as the reference); if too few codes pass it, the rest are drawn without it.
    """
    rng = random.Random(f"{EVAL_NAMESPACE}:{seed}:distractors:{sample}:{lang}")
    digits = len(str(code))
    low, high = max(10 ** (digits - 1), CODE_RANGE[0]), min(10**digits, CODE_RANGE[1])
    codes: list[int] = []
    for attempt in range(100 * count + 10_000):
        if len(codes) == count:
            break
        candidate = rng.randrange(low, high)
        strict = attempt < 100 * count + 5_000 and accept is not None
        if candidate == code or candidate in codes or (strict and not accept(candidate)):
            continue
        codes.append(candidate)
    return codes


@dataclass(frozen=True)
class _WithoutNeedle:
    """A needle task's question and answer over its filler alone (the no-needle control)."""

    task: NeedleTask

    @property
    def lang(self) -> Lang:
        return self.task.lang

    def render(self, paragraphs: list[list[str]]) -> Rendered:
        planted = self.task.render(paragraphs)
        document = "\n\n".join(antihaystack.join_paragraphs(paragraphs, self.lang))
        return Rendered(document, planted.question, planted.answer, ())


def calibrate(tokenizer: Any, seed: int, lang: Lang, haystack: Haystack | None = None) -> float:
    """Characters per token of this tokenizer on filler text: the fit's first guess. A prompt
    depends on it, so every prompt of a seed uses the same calibration text."""
    return antihaystack.calibrate(
        f"{EVAL_NAMESPACE}:{seed}", lang, lambda text: len(encode(tokenizer, text)), haystack
    )


def build_prompt(
    tokenizer: Any,
    *,
    length: int,
    depth: float,
    sample: int,
    seed: int = 0,
    lang: Lang = "en",
    distractors: int = 4,
    chars_per_token: float | None = None,
    planted: bool = True,
    haystack: Haystack | None = None,
) -> NiahPrompt:
    """One grid prompt: sample ``sample``'s needle at ``depth`` in a ``length``-token prompt.

    ``planted=False`` makes the control prompt: the same question over filler alone, with no
    needle (``measured_depth`` None). A model that still prefers the reference answer there
    does so from its prior over codes, not by retrieval. ``haystack`` is real filler text in
    place of generated prose.
    """
    subject, code = eval_needle(seed, sample, lang)
    task = NeedleTask(lang, (subject,), (code,), (depth,))
    key = f"{EVAL_NAMESPACE}:{seed}:{sample}"
    if chars_per_token is None:
        chars_per_token = calibrate(tokenizer, seed, lang, haystack)

    def templated_ids(rendered: Rendered) -> list[int]:
        return encode(tokenizer, generation_prompt(tokenizer, rendered.prompt))

    rng = random.Random(f"{key}:filler")
    filler = haystack.filler(rng, lang) if haystack else SyntheticFiller(rng, lang)
    # Never over `length`: a "128K" prompt must fit a 128K context.
    rendered = fit_prompt(
        task if planted else _WithoutNeedle(task), filler, length, chars_per_token, templated_ids
    )
    ids = templated_ids(rendered)
    before, after = answer_frame(tokenizer, rendered.prompt)
    target_ids = lambda sentence: tuple(encode(tokenizer, before + sentence + after))  # noqa: E731
    answer_ids = target_ids(rendered.answer)
    # Distractor answers as long in tokens as the reference, or a summed log-probability would
    # favour whichever candidate tokenizes shortest.
    others = distractor_codes(
        seed,
        sample,
        lang,
        code,
        distractors,
        accept=lambda other: (
            len(target_ids(task.needle_sentence(subject, other))) == len(answer_ids)
        ),
    )
    return NiahPrompt(
        length=length,
        depth=depth,
        sample=sample,
        key=key,
        lang=lang,
        prompt_ids=tuple(ids),
        measured_depth=rendered.depths[0] if planted else None,
        subject=subject,
        code=code,
        question=rendered.question,
        answer=rendered.answer,
        distractor_codes=tuple(others),
        distractors=tuple(task.needle_sentence(subject, other) for other in others),
        planted=planted,
        answer_ids=answer_ids,
        distractor_ids=tuple(target_ids(task.needle_sentence(subject, other)) for other in others),
    )


def build_controls(
    tokenizer: Any,
    length: int,
    samples: int,
    *,
    seed: int = 0,
    lang: Lang = "en",
    distractors: int = 4,
    haystack: Haystack | None = None,
) -> list[NiahPrompt]:
    """One needle-less control prompt per sample, ``length`` tokens long (see ``build_prompt``)."""
    chars_per_token = calibrate(tokenizer, seed, lang, haystack)
    return [
        build_prompt(
            tokenizer,
            length=length,
            depth=0.5,
            sample=sample,
            seed=seed,
            lang=lang,
            distractors=distractors,
            chars_per_token=chars_per_token,
            planted=False,
            haystack=haystack,
        )
        for sample in range(samples)
    ]


def build_grid(
    tokenizer: Any,
    lengths: Sequence[int],
    depths: Sequence[float],
    samples_per_cell: int = 1,
    *,
    seed: int = 0,
    lang: Lang = "en",
    distractors: int = 4,
    on_prompt: Callable[[NiahPrompt], None] | None = None,
    haystack: Haystack | None = None,
) -> list[NiahPrompt]:
    """Every (length, depth, sample) prompt, lengths outermost; ``on_prompt`` sees each one."""
    if samples_per_cell < 1:
        raise ValueError("samples_per_cell must be >= 1")
    chars_per_token = calibrate(tokenizer, seed, lang, haystack)
    prompts = []
    for length in lengths:
        for depth in depths:
            for sample in range(samples_per_cell):
                prompt = build_prompt(
                    tokenizer,
                    length=length,
                    depth=depth,
                    sample=sample,
                    seed=seed,
                    lang=lang,
                    distractors=distractors,
                    chars_per_token=chars_per_token,
                    haystack=haystack,
                )
                if on_prompt is not None:
                    on_prompt(prompt)
                prompts.append(prompt)
    return prompts
