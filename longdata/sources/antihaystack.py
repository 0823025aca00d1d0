"""Seeded long-context retrieval tasks ("anti-haystack"): find facts planted in long filler.

Two task types, in English and Chinese:

- ``needle``: one or more facts such as "The secret code of the amber lantern is 48213." are
  planted at chosen relative depths of a filler document; the question asks for the codes.
- ``paragraph``: the paragraphs are numbered, one of them mentions a unique phrase, and the
  question asks which paragraph does.

Each conversation's length (user text plus answer, without chat-template tokens) is fitted to a
target drawn log-uniformly from ``[min_tokens, max_tokens]`` with the caller's ``count_tokens``.
Filler and planted words come from disjoint vocabularies (``synthetic.MARKER_*``), so the
planted phrases occur exactly once. Item ``i`` depends only on ``(seed, i)``.

The filler is generated prose by default. With a ``Haystack`` (real essays, books, code) it is
consecutive sentences of the haystack from a seeded start instead, wrapping around at the end;
the same fitting then grows or cuts it, and a marker phrase the haystack happens to contain is
never used, so planted phrases stay unique.
"""

from __future__ import annotations

import bisect
import math
import random
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from longdata.records import Conversation, Message
from longdata.sources import synthetic
from longdata.sources.synthetic import Lang

TASKS = ("needle", "paragraph")
TOKEN_TOLERANCE = 0.02  # aim inside 2% so that callers can rely on 3%
MAX_FIT_ROUNDS = 6
CALIBRATION_CHARS = 20_000
PARAGRAPH_BREAK_PROBABILITY = 0.2  # paragraphs of five sentences on average
MAX_SKIPPED_SENTENCES = 8

Paragraphs = list[list[str]]  # a document as paragraphs of sentences
CountTokens = Callable[[str], int]


@dataclass(frozen=True)
class Rendered:
    """One attempt at a task for a given filler: the prompt, the answer and where things landed."""

    document: str
    question: str
    answer: str
    depths: tuple[float, ...]  # relative start offsets of the planted text in ``document``

    @property
    def prompt(self) -> str:
        return f"{self.document}\n\n{self.question}"


def join_paragraphs(paragraphs: Paragraphs, lang: Lang) -> list[str]:
    separator = synthetic.sentence_separator(lang)
    return [separator.join(sentences) for sentences in paragraphs]


def _planted_depths(document: str, planted: list[str]) -> tuple[float, ...]:
    return tuple(round(document.index(text) / len(document), 4) for text in planted)


@dataclass(frozen=True)
class NeedleTask:
    """Facts planted as extra sentences at the sentence boundary nearest each requested depth."""

    lang: Lang
    subjects: tuple[str, ...]
    codes: tuple[int, ...]
    requested_depths: tuple[float, ...]

    def needle_sentence(self, subject: str, code: int) -> str:
        if self.lang == "en":
            return f"The secret code of the {subject} is {code}."
        return f"{subject}的秘密代码是{code}。"

    def _question(self) -> str:
        if self.lang == "en":
            names = [f"the {s}" for s in self.subjects]
            if len(names) == 1:
                return f"What is the secret code of {names[0]}? Answer with the number."
            listed = ", ".join(names[:-1]) + f" and {names[-1]}"
            return f"What are the secret codes of {listed}? Give each one."
        if len(self.subjects) == 1:
            return f"{self.subjects[0]}的秘密代码是多少？请回答数字。"
        listed = "、".join(self.subjects[:-1]) + f"和{self.subjects[-1]}"
        return f"{listed}的秘密代码分别是多少？"

    def render(self, paragraphs: Paragraphs) -> Rendered:
        needles = [self.needle_sentence(s, c) for s, c in zip(self.subjects, self.codes)]
        document = plant_sentences(paragraphs, needles, self.requested_depths, self.lang)
        separator = synthetic.sentence_separator(self.lang)
        return Rendered(
            document, self._question(), separator.join(needles), _planted_depths(document, needles)
        )


def sentence_boundaries(
    paragraphs: Paragraphs, depths: Sequence[float], lang: Lang
) -> list[tuple[int, int]]:
    """(paragraph, sentence index) of the sentence boundary nearest each relative depth, by
    character position in the joined text: paragraphs differ in length, so a depth is a place in
    the text, not a paragraph number."""
    separator = synthetic.sentence_separator(lang)
    # Every place a sentence may be inserted: (char offset in the joined text, para, index).
    slots: list[tuple[int, int, int]] = []
    paragraph_start = 0
    for p, sentences in enumerate(paragraphs):
        offset = paragraph_start
        for s, text in enumerate(sentences):
            slots.append((offset, p, s))
            offset += len(text) + len(separator)
        paragraph_end = paragraph_start + len(separator.join(sentences))
        slots.append((paragraph_end, p, len(sentences)))
        paragraph_start = paragraph_end + 2  # "\n\n"
    total = max(paragraph_start - 2, 1)
    starts = [slot[0] for slot in slots]
    boundaries = []
    for depth in depths:
        i = min(bisect.bisect_left(starts, depth * total), len(slots) - 1)
        if i > 0 and depth * total - starts[i - 1] < starts[i] - depth * total:
            i -= 1
        boundaries.append(slots[i][1:])
    return boundaries


def plant_sentences(
    paragraphs: Paragraphs, planted_sentences: Sequence[str], depths: Sequence[float], lang: Lang
) -> str:
    """Insert each sentence at the sentence boundary nearest its relative depth; the document."""
    planted = [list(sentences) for sentences in paragraphs]
    placements = [
        (p, s, sentence)
        for (p, s), sentence in zip(
            sentence_boundaries(paragraphs, depths, lang), planted_sentences
        )
    ]
    # Insert back to front so that earlier slot indices stay valid.
    for p, s, sentence in sorted(placements, key=lambda x: (x[0], x[1]), reverse=True):
        planted[p].insert(s, sentence)
    return "\n\n".join(join_paragraphs(planted, lang))


_MENTION_TEMPLATES = {
    "en": (
        "A note about the {} was found here.",
        "Nobody expected to see the {} in this place.",
        "Some travellers still talk about the {}.",
    ),
    "zh": ("有人在这里提到了{}。", "这里曾经出现过{}。", "很多旅人还在谈论{}。"),
}


@dataclass(frozen=True)
class ParagraphTask:
    """Numbered paragraphs; one mentions a unique phrase, at the sentence boundary nearest the
    requested depth of the text (``Rendered.depths``: where it landed)."""

    lang: Lang
    phrase: str
    template: str
    requested_depth: float

    def render(self, paragraphs: Paragraphs) -> Rendered:
        [(target, at)] = sentence_boundaries(paragraphs, [self.requested_depth], self.lang)
        mention = self.template.format(self.phrase)
        planted = [list(sentences) for sentences in paragraphs]
        planted[target].insert(at, mention)
        if self.lang == "en":
            joined = join_paragraphs(planted, "en")
            numbered = [f"Paragraph {i}: {t}" for i, t in enumerate(joined, 1)]
            question = f"Which paragraph mentions the {self.phrase}? Answer with its number."
            answer = f"Paragraph {target + 1}"
        else:
            joined = join_paragraphs(planted, "zh")
            numbered = [f"第{i}段：{t}" for i, t in enumerate(joined, 1)]
            question = f"哪一段提到了{self.phrase}？请回答段落编号。"
            answer = f"第{target + 1}段"
        document = "\n\n".join(numbered)
        return Rendered(document, question, answer, _planted_depths(document, [mention]))


Task = NeedleTask | ParagraphTask  # or any task of ``ruler`` (same ``render``)


class SyntheticFiller:
    """Generated prose, one fresh sentence at a time."""

    def __init__(self, rng: random.Random, lang: Lang):
        self.rng, self.lang = rng, lang

    def next_sentence(self) -> str:
        return synthetic.sentence(self.rng, self.lang)

    def starts_paragraph(self) -> bool:
        """Whether the sentence just taken opens a new paragraph."""
        return self.rng.random() < PARAGRAPH_BREAK_PROBABILITY


class HaystackFiller:
    """Consecutive sentences of a haystack, keeping its paragraph breaks."""

    def __init__(
        self, sentences: Sequence[str], paragraph_starts: Sequence[bool], start: int, lang: Lang
    ):
        self.sentences, self.paragraph_starts, self.lang = sentences, paragraph_starts, lang
        self.cursor, self._opens = start, False

    def next_sentence(self) -> str:
        sentence, self._opens = self.sentences[self.cursor], self.paragraph_starts[self.cursor]
        self.cursor = (self.cursor + 1) % len(self.sentences)
        return sentence

    def starts_paragraph(self) -> bool:
        return self._opens


Filler = SyntheticFiller | HaystackFiller
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
_SENTENCE_END = {"en": re.compile(r"(?<=[.!?])\s+"), "zh": re.compile(r"(?<=[。！？])")}


@dataclass(frozen=True)
class Haystack:
    """Real filler text, split into sentences per language (each document tagged by script)."""

    sentences: dict[str, tuple[str, ...]]
    paragraph_starts: dict[str, tuple[bool, ...]]
    text: dict[str, str]  # every sentence of a language joined: where marker phrases are looked up
    source: str

    @classmethod
    def from_texts(cls, documents: Iterable[str], source: str = "haystack") -> Haystack:
        from longdata.stages.tokenization import detect_text_language

        sentences: dict[str, list[str]] = {}
        starts: dict[str, list[bool]] = {}
        for document in documents:
            lang = detect_text_language(document)
            for paragraph in _PARAGRAPH_BREAK.split(document):
                split = [s.strip() for s in _SENTENCE_END[lang].split(" ".join(paragraph.split()))]
                split = [s for s in split if s]
                sentences.setdefault(lang, []).extend(split)
                starts.setdefault(lang, []).extend(i == 0 for i in range(len(split)))
        sentences = {lang: found for lang, found in sentences.items() if found}
        if not sentences:
            raise ValueError(f"haystack {source}: no text to use as filler")
        return cls(
            {lang: tuple(found) for lang, found in sentences.items()},
            {lang: tuple(starts[lang]) for lang in sentences},
            {lang: "\n".join(found).lower() for lang, found in sentences.items()},
            source,
        )

    @classmethod
    def from_paths(cls, paths: Sequence[str | Path]) -> Haystack:
        """Text files, directories of them, or JSONL/Parquet with a ``text`` field."""
        from longdata.sources.text import haystack_documents

        documents = [d.text for path in paths for d in haystack_documents(str(path))]
        return cls.from_texts(documents, source=", ".join(map(str, paths)))

    @property
    def languages(self) -> tuple[Lang, ...]:
        return tuple(lang for lang in synthetic.LANGS if lang in self.sentences)

    def filler(self, rng: random.Random, lang: Lang) -> HaystackFiller:
        if lang not in self.sentences:
            raise ValueError(f"haystack {self.source} has no {lang} text")
        start = rng.randrange(len(self.sentences[lang]))
        return HaystackFiller(self.sentences[lang], self.paragraph_starts[lang], start, lang)

    def contains(self, phrase: str) -> bool:
        return phrase.lower() in self.text.get(
            "zh" if re.search(r"[\u4e00-\u9fff]", phrase) else "en", ""
        )


def fit(
    task: Task,
    filler: Filler,
    *,
    target_tokens: int,
    chars_per_token: float,
    measure: Callable[[Rendered], int],
    window: tuple[float, float],
    limit: int | None = None,
    max_rounds: int = MAX_FIT_ROUNDS,
) -> tuple[Rendered, int]:
    """Grow or shrink the filler sentence by sentence until ``measure(rendered)`` is in ``window``.

    The one fitting loop for training items (``measure`` counts prompt and answer, the window is
    the target +- 2%) and eval prompts (``measure`` counts the whole chat-templated prompt, the
    window ends at ``limit``). Each round measures the whole text once and converts the
    remaining error to characters with that text's own chars/token, so a couple of rounds
    suffice even for 100k-token documents. Tiny targets can only get within about half a short
    sentence. If no round lands in the window, the attempt closest to ``target_tokens`` is
    returned, among those of at most ``limit`` tokens when a limit is given; ValueError if none
    is that short.
    """
    low, high = window
    paragraphs: Paragraphs = []
    deficit_chars = target_tokens * chars_per_token
    best: tuple[Rendered, int] | None = None
    for _ in range(max_rounds):
        if deficit_chars > 0:
            _extend(paragraphs, filler, deficit_chars)
        elif paragraphs:
            _shrink(paragraphs, -deficit_chars)
        rendered = task.render(paragraphs)
        tokens = measure(rendered)
        allowed = limit is None or tokens <= limit
        if allowed and (best is None or abs(tokens - target_tokens) < abs(best[1] - target_tokens)):
            best = (rendered, tokens)
        if low <= tokens <= high:
            break
        measured = (len(rendered.prompt) + len(rendered.answer)) / tokens
        deficit_chars = (target_tokens - tokens) * measured
    if best is None:
        raise ValueError(
            f"cannot fit the task into {limit} tokens: its fixed parts (any template, the planted "
            "text and the question) alone are longer"
        )
    return best


def _extend(paragraphs: Paragraphs, filler: Filler, n_chars: float) -> None:
    """Append about ``n_chars`` of the filler's sentences. Near the goal, sentences that would
    overshoot by more than half their length are skipped in favour of shorter ones, which gets
    small targets closer than whole run-on sentences could."""
    added = 0
    skipped = 0
    while skipped < MAX_SKIPPED_SENTENCES:
        sentence = filler.next_sentence()
        if paragraphs and added + len(sentence) / 2 > n_chars:
            skipped += 1
            continue
        if not paragraphs or filler.starts_paragraph():
            paragraphs.append([])
        paragraphs[-1].append(sentence)
        added += len(sentence)


def _shrink(paragraphs: Paragraphs, n_chars: float) -> None:
    """Drop trailing sentences until at least ``n_chars`` are gone (keeping one sentence).

    Undershooting is deliberate: ``_extend`` can then pick a short sentence that fits, whereas
    stopping early could leave a long sentence that neither step can get rid of."""
    removed = 0
    while removed < n_chars and (len(paragraphs) > 1 or len(paragraphs[0]) > 1):
        last = paragraphs[-1]
        removed += len(last.pop())
        if not last:
            paragraphs.pop()


def _log_uniform(rng: random.Random, low: int, high: int) -> int:
    return round(math.exp(rng.uniform(math.log(low), math.log(high))))


def _make_task(
    rng: random.Random,
    kind: str,
    lang: Lang,
    depth_range: tuple[float, float],
    needles: tuple[int, int],
    haystack: Haystack | None = None,
) -> Task:
    if kind not in TASKS:
        from longdata.sources import ruler  # ruler builds on this module's filler and fitting

        return ruler.make_task(rng, kind, lang, depth_range, haystack)

    def unused(phrase: str) -> bool:
        return haystack is None or not haystack.contains(phrase)

    if kind == "needle":
        n = rng.randint(*needles)
        subjects: list[str] = []
        while len(subjects) < n:  # distinct subjects, or the question would be ambiguous
            phrase = synthetic.marker_phrase(rng, lang)
            if phrase not in subjects and unused(phrase):
                subjects.append(phrase)
        codes = rng.sample(range(1_000, 1_000_000), n)
        depths = tuple(rng.uniform(*depth_range) for _ in range(n))
        return NeedleTask(lang, tuple(subjects), tuple(codes), depths)
    template = rng.choice(_MENTION_TEMPLATES[lang])
    phrase = synthetic.marker_phrase(rng, lang)
    while not unused(phrase):
        phrase = synthetic.marker_phrase(rng, lang)
    return ParagraphTask(lang, phrase, template, rng.uniform(*depth_range))


def calibrate(
    seed: int | str, lang: Lang, count_tokens: CountTokens, haystack: Haystack | None = None
) -> float:
    """Characters per token of ``count_tokens`` on filler text keyed by ``seed`` (generated, or
    the haystack's): the first guess of ``fit``."""
    rng = random.Random(f"{seed}:calibration:{lang}")
    if haystack is None:
        sample = "\n\n".join(synthetic.document(rng, lang, CALIBRATION_CHARS))
    else:
        filler, sentences, chars = haystack.filler(rng, lang), [], 0
        while chars < CALIBRATION_CHARS and len(sentences) < len(filler.sentences):
            sentences.append(filler.next_sentence())
            chars += len(sentences[-1])
        sample = synthetic.sentence_separator(lang).join(sentences)
    return len(sample) / count_tokens(sample)


def generate(
    *,
    count: int,
    min_tokens: int,
    max_tokens: int,
    depth_range: tuple[float, float] = (0.0, 1.0),
    needles: tuple[int, int] = (1, 3),
    tasks: tuple[str, ...] = TASKS,
    languages: tuple[Lang, ...] = ("en", "zh"),
    zh_fraction: float = 0.1,
    seed: int,
    count_tokens: CountTokens,
    indices: Iterable[int] | None = None,
    haystack: Haystack | None = None,
) -> Iterator[Conversation]:
    """Yield ``count`` retrieval conversations (user prompt, assistant answer).

    ``zh_fraction`` applies when both languages are allowed; with one, every item uses it.
    ``indices`` (a subset of ``range(count)``) generates only those items, e.g. one worker's share:
    item ``i`` depends on ``(seed, i)`` alone. ``haystack`` replaces the generated filler with
    real text; only the languages it has text in are used.
    """
    if not 0 < min_tokens <= max_tokens:
        raise ValueError(f"need 0 < min_tokens <= max_tokens, got {min_tokens}, {max_tokens}")
    if not 0.0 <= depth_range[0] <= depth_range[1] <= 1.0:
        raise ValueError(f"depth_range must lie in [0, 1], got {depth_range}")
    if not 1 <= needles[0] <= needles[1]:
        raise ValueError(f"needles must be (low, high) with 1 <= low <= high, got {needles}")
    from longdata.sources import ruler

    known = TASKS + ruler.TASKS
    if not tasks or set(tasks) - set(known):
        raise ValueError(f"tasks must be a non-empty subset of {known}, got {tasks}")
    if not languages or set(languages) - set(synthetic.LANGS):
        raise ValueError(f"languages must be a non-empty subset of {synthetic.LANGS}")
    if haystack is not None:
        languages = tuple(lang for lang in languages if lang in haystack.languages)
        if not languages:
            raise ValueError(f"haystack {haystack.source} has no text in any allowed language")
    chars_per_token = {lang: calibrate(seed, lang, count_tokens, haystack) for lang in languages}
    for index in range(count) if indices is None else indices:
        rng = random.Random(f"{seed}:{index}")
        if len(languages) == 1:
            lang = languages[0]
        else:
            lang = "zh" if rng.random() < zh_fraction else "en"
        kind = rng.choice(tasks)
        target = _log_uniform(rng, min_tokens, max_tokens)
        task = _make_task(rng, kind, lang, depth_range, needles, haystack)
        filler = haystack.filler(rng, lang) if haystack else SyntheticFiller(rng, lang)
        rendered, tokens = fit(
            task,
            filler,
            target_tokens=target,
            chars_per_token=chars_per_token[lang],
            measure=lambda r: count_tokens(r.prompt) + count_tokens(r.answer),
            window=((1 - TOKEN_TOLERANCE) * target, (1 + TOKEN_TOLERANCE) * target),
        )
        if isinstance(task, ParagraphTask):
            requested = (task.requested_depth,)
        else:
            requested = task.requested_depths
        yield Conversation(
            messages=(Message("user", rendered.prompt), Message("assistant", rendered.answer)),
            location=f"antihaystack[{index}]",
            position=index,
            meta={
                "task": kind,
                "lang": lang,
                "target_tokens": str(target),
                "tokens": str(tokens),
                "requested_depths": ",".join(f"{d:.4f}" for d in requested),
                "depths": ",".join(f"{d:.4f}" for d in rendered.depths),
            },
        )
