"""RULER-style task families over the anti-haystack filler: harder than one needle.

- ``multikey``: the asked-for secret code among other subjects' codes and NExtLong-style hard
  negatives (the same subject's *spare* code).
- ``multivalue``: one subject has several secret codes; every one must be returned.
- ``vartrack``: chains of assignments (``VAR ABCDE = 12345``, ``VAR FGHIJ = VAR ABCDE``) beside
  a distractor chain; which variables hold the value?
- ``cwe``: keywords repeated through the text; which ``k`` occur most often (aggregation)?
- ``qa``: one passage of generated facts among distractor passages about other subjects.

Every task is a list of planted sentences, marked as signal or not, placed in
``antihaystack``'s filler (generated or a real ``Haystack``) and fitted to a token length by
``antihaystack.fit``, so the sources share one filler, one placement and one fitting loop. The
recipe uses them through ``kind: antihaystack`` (``tasks: [multikey, ...]``). ``control`` drops
the signal sentences: the question then has no answer in the prompt, so any model scores at
chance (`chance_accuracy`: one blind guess; qa's 1/121, a town of two syllables, is the largest).

Training answers are sentences that restate what was asked before the items ("The secret code
of the cobalt falcon is 34215."), as the needle task's answers do and RULER's answer prefixes
do: the subject is then written right before the item the model must retrieve. The scorer
looks only for the items.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from math import comb
from string import ascii_uppercase

from longdata.sources import synthetic
from longdata.sources.antihaystack import Haystack, Paragraphs, Rendered, plant_sentences
from longdata.sources.synthetic import Lang

TASKS = ("multikey", "multivalue", "vartrack", "cwe", "qa")
CWE_TOP = 3  # how many most frequent keywords the cwe question asks for
CODES = range(10_000, 100_000)  # 5-digit secret codes and values
MULTIVALUE_CODES = (2, 4)  # how many codes a multivalue subject has (inclusive)
CHAIN_LENGTHS = (2, 4)  # how many variables the asked vartrack chain has (inclusive)
VARIABLE_LETTERS = 5  # RULER's variable names: 5 capitals
_TOWN_SYLLABLES = ("var", "hol", "mer", "dun", "sket", "bra", "lin", "quor", "tam", "vel", "zor")
_ZH_TOWN_CHARS = "青石白河松岭云溪枫桥柳湾"


@dataclass(frozen=True)
class PlantedTask:
    """Sentences planted at relative depths; ``signal`` marks the ones the answer needs."""

    kind: str
    lang: Lang
    sentences: tuple[str, ...]
    signal: tuple[bool, ...]
    requested_depths: tuple[float, ...]
    question: str
    answer: str
    expected: tuple[str, ...]  # every item the answer must contain
    distractors: tuple[str, ...]  # items that make an answer wrong (the prompt offers them)

    def render(self, paragraphs: Paragraphs) -> Rendered:
        document = plant_sentences(paragraphs, self.sentences, self.requested_depths, self.lang)
        planted = [s for s, is_signal in zip(self.sentences, self.signal) if is_signal]
        depths = tuple(round(document.index(s) / len(document), 4) for s in planted)
        return Rendered(document, self.question, self.answer, depths)

    def control(self) -> PlantedTask:
        """The same prompt without its signal sentences: no answer is recoverable."""
        kept = [i for i, is_signal in enumerate(self.signal) if not is_signal]
        return replace(
            self,
            sentences=tuple(self.sentences[i] for i in kept),
            signal=tuple(False for _ in kept),
            requested_depths=tuple(self.requested_depths[i] for i in kept),
        )


def _names(output: str, item: str) -> bool:
    """Whether ``output`` names ``item`` whole and case-insensitively: ``1234`` is not found in
    ``12345``."""
    pattern = rf"(?<![0-9A-Za-z]){re.escape(item)}(?![0-9A-Za-z])"
    return re.search(pattern, output, flags=re.IGNORECASE) is not None


def score(expected: Sequence[str], distractors: Sequence[str], output: str) -> float:
    """1.0 when the output names every expected item and no distractor, else 0.0 (a partial
    multi-value answer scores 0)."""
    every_item = all(_names(output, item) for item in expected)
    return float(every_item and not any(_names(output, item) for item in distractors))


def recall(expected: Sequence[str], output: str) -> float:
    """The share of the expected items the output names, distractors not counted: RULER's own
    metric (``string_match_all``; for a one-item answer its ``string_match_part`` is the same),
    with items matched whole as `score` matches them. Partial credit, so it shows a skill half
    learned, and compares with published RULER tables; `score` is the exact answer."""
    return sum(_names(output, item) for item in expected) / len(expected)


def _phrases(rng: random.Random, lang: Lang, n: int, haystack: Haystack | None) -> list[str]:
    """``n`` distinct marker phrases that the haystack (if any) never contains."""
    phrases: list[str] = []
    while len(phrases) < n:
        phrase = synthetic.marker_phrase(rng, lang)
        if phrase not in phrases and (haystack is None or not haystack.contains(phrase)):
            phrases.append(phrase)
    return phrases


def _listed(items: Sequence[str], lang: Lang) -> str:
    return ", ".join(items) if lang == "en" else "、".join(items)


def _code(rng: random.Random, taken: set[int]) -> int:
    while True:
        code = rng.randrange(CODES.start, CODES.stop)
        if code not in taken:
            taken.add(code)
            return code


def _multikey(rng: random.Random, lang: Lang, haystack: Haystack | None) -> dict:
    target, *others = _phrases(rng, lang, rng.randint(2, 4), haystack)
    taken: set[int] = set()
    code = _code(rng, taken)
    other_codes = [_code(rng, taken) for _ in others]
    spare_codes = [_code(rng, taken) for _ in range(rng.randint(1, 2))]
    if lang == "en":
        needle = "The secret code of the {} is {}."
        spare = "The spare code of the {} is {}."
        question = f"What is the secret code of the {target}? Answer with the number."
    else:
        needle, spare = "{}的秘密代码是{}。", "{}的备用代码是{}。"
        question = f"{target}的秘密代码是多少？请回答数字。"
    distractors = [needle.format(s, c) for s, c in zip(others, other_codes)]
    distractors += [spare.format(target, c) for c in spare_codes]
    return dict(
        signal_sentences=[needle.format(target, code)],
        distractor_sentences=distractors,
        question=question,
        answer=needle.format(target, code),
        expected=[str(code)],
        distractors=[str(c) for c in other_codes + spare_codes],
    )


def _multivalue(rng: random.Random, lang: Lang, haystack: Haystack | None) -> dict:
    (subject,) = _phrases(rng, lang, 1, haystack)
    taken: set[int] = set()
    codes = [str(_code(rng, taken)) for _ in range(rng.randint(*MULTIVALUE_CODES))]
    if lang == "en":
        template = "One of the secret codes of the {} is {}."
        question = f"What are all the secret codes of the {subject}? Give every one."
        answer = f"The secret codes of the {subject} are {_listed(codes, lang)}."
    else:
        template = "{}的秘密代码之一是{}。"
        question = f"{subject}的所有秘密代码是什么？请全部列出。"
        answer = f"{subject}的秘密代码是{_listed(codes, lang)}。"
    return dict(
        signal_sentences=[template.format(subject, c) for c in codes],
        distractor_sentences=[],
        question=question,
        answer=answer,
        expected=codes,
        distractors=[],
    )


def _variable_names(rng: random.Random, n: int) -> list[str]:
    names: list[str] = []
    while len(names) < n:
        name = "".join(rng.choice(ascii_uppercase) for _ in range(VARIABLE_LETTERS))
        if name not in names:
            names.append(name)
    return names


def _chain(names: Sequence[str], value: int, lang: Lang) -> list[str]:
    end = "." if lang == "en" else "。"
    first = [f"VAR {names[0]} = {value}{end}"]
    return first + [f"VAR {b} = VAR {a}{end}" for a, b in zip(names, names[1:])]


def _vartrack(rng: random.Random, lang: Lang, haystack: Haystack | None) -> dict:
    length, decoy_length = rng.randint(*CHAIN_LENGTHS), rng.randint(1, 3)
    names = _variable_names(rng, length + decoy_length)
    taken: set[int] = set()
    value, decoy_value = _code(rng, taken), _code(rng, taken)
    chained = _listed(names[:length], lang)
    if lang == "en":
        question = f"Which variables are assigned the value {value}? List them all."
        answer = f"The variables assigned the value {value} are {chained}."
    else:
        question = f"哪些变量的值是{value}？请全部列出。"
        answer = f"值为{value}的变量是{chained}。"
    return dict(
        signal_sentences=_chain(names[:length], value, lang),
        distractor_sentences=_chain(names[length:], decoy_value, lang),
        question=question,
        answer=answer,
        expected=names[:length],
        distractors=names[length:],
        ordered=True,  # an assignment must come after the variable it copies
    )


def _cwe(rng: random.Random, lang: Lang, haystack: Haystack | None) -> dict:
    words = _phrases(rng, lang, CWE_TOP + rng.randint(2, 4), haystack)
    top, rest = words[:CWE_TOP], words[CWE_TOP:]
    top_counts = sorted(rng.sample(range(5, 9), CWE_TOP), reverse=True)
    template = "Keyword: {}." if lang == "en" else "关键词：{}。"
    signal = [template.format(w) for w, n in zip(top, top_counts) for _ in range(n)]
    decoys = [template.format(w) for w in rest for _ in range(rng.randint(1, 3))]
    if lang == "en":
        question = f"Which {CWE_TOP} keywords occur most often in the text? List them."
        answer = f"The keywords that occur most often are {_listed(top, lang)}."
    else:
        question = f"文中出现次数最多的{CWE_TOP}个关键词是什么？请列出。"
        answer = f"出现次数最多的关键词是{_listed(top, lang)}。"
    return dict(
        signal_sentences=signal,
        distractor_sentences=decoys,
        question=question,
        answer=answer,
        expected=top,
        distractors=rest,
    )


def _town(rng: random.Random, lang: Lang) -> str:
    if lang == "en":
        return "".join(rng.choice(_TOWN_SYLLABLES) for _ in range(2)).capitalize()
    return "".join(rng.sample(_ZH_TOWN_CHARS, 2)) + "镇"


def _town_count(lang: Lang) -> int:
    """How many towns `_town` can name (no syllable starts another, so each pair is its own)."""
    if lang == "en":
        return len(_TOWN_SYLLABLES) ** 2
    return len(_ZH_TOWN_CHARS) * (len(_ZH_TOWN_CHARS) - 1)


def _qa(rng: random.Random, lang: Lang, haystack: Haystack | None) -> dict:
    subjects = _phrases(rng, lang, rng.randint(3, 5), haystack)
    towns: list[str] = []
    while len(towns) < len(subjects):
        town = _town(rng, lang)
        if town not in towns:
            towns.append(town)
    if lang == "en":
        template = "The {} was made in the town of {} in the year {}. Its maker never left {}."
        question = f"In which town was the {subjects[0]} made? Answer with the town's name."
    else:
        template = "{}是{}年在{}制作的。它的制作者从未离开过{}。"
        question = f"{subjects[0]}是在哪个镇制作的？请回答镇名。"
    years = rng.sample(range(1200, 1900), len(subjects))
    if lang == "en":
        passages = [template.format(s, t, y, t) for s, t, y in zip(subjects, towns, years)]
        answer = f"The {subjects[0]} was made in the town of {towns[0]}."
    else:
        passages = [template.format(s, y, t, t) for s, t, y in zip(subjects, towns, years)]
        answer = f"{subjects[0]}是在{towns[0]}制作的。"
    return dict(
        signal_sentences=passages[:1],
        distractor_sentences=passages[1:],
        question=question,
        answer=answer,
        expected=towns[:1],
        distractors=towns[1:],
    )


_MAKERS = {
    "multikey": _multikey,
    "multivalue": _multivalue,
    "vartrack": _vartrack,
    "cwe": _cwe,
    "qa": _qa,
}


def chance_accuracy(kind: str, lang: Lang) -> float:
    """What a model that ignores the prompt scores, as `eval niah` states its chance: one guess
    drawn from the answers the task can have, at its fewest items. A control (no signal in the
    prompt) well above this leaks the answer."""
    answers = {
        "multikey": len(CODES),
        "multivalue": comb(len(CODES), MULTIVALUE_CODES[0]),
        "vartrack": comb(len(ascii_uppercase) ** VARIABLE_LETTERS, CHAIN_LENGTHS[0]),
        "cwe": comb(synthetic.marker_phrase_count(lang), CWE_TOP),
        "qa": _town_count(lang),
    }
    return 1 / answers[kind]


def make_task(
    rng: random.Random,
    kind: str,
    lang: Lang,
    depth_range: tuple[float, float] = (0.0, 1.0),
    haystack: Haystack | None = None,
) -> PlantedTask:
    """One task of ``kind``: signal sentences at depths in ``depth_range``, distractors anywhere."""
    parts = _MAKERS[kind](rng, lang, haystack)
    signal_depths = [rng.uniform(*depth_range) for _ in parts["signal_sentences"]]
    decoy_depths = [rng.uniform(0.0, 1.0) for _ in parts["distractor_sentences"]]
    if parts.get("ordered"):
        signal_depths.sort()
        decoy_depths.sort()
    sentences = parts["signal_sentences"] + parts["distractor_sentences"]
    return PlantedTask(
        kind=kind,
        lang=lang,
        sentences=tuple(sentences),
        signal=tuple(i < len(parts["signal_sentences"]) for i in range(len(sentences))),
        requested_depths=tuple(signal_depths + decoy_depths),
        question=parts["question"],
        answer=parts["answer"],
        expected=tuple(parts["expected"]),
        distractors=tuple(parts["distractors"]),
    )
