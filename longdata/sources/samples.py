"""Offline sample files in the exact schemas of the public datasets the readers consume.

The build machines cannot download LongAlign-10k or LongAlpaca-12k, so recipes refer to
``builtin:sample/<name>`` and the reader materialises the file through ``SAMPLE_SCHEMAS``. The
files copy the real layout key by key (including the extra keys real rows carry), so the real
readers are exercised, and they are byte-identical for the same seed and arguments.

Lengths are given in characters: this module has no tokenizer.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from longdata.sources import synthetic
from longdata.sources.synthetic import Lang

Row = dict[str, Any]

# Question templates per language; the answer is always a few synthetic sentences, except for
# the title question, whose answer is the title printed at the top of the document.
_QUESTIONS = {
    "en": (
        "Summarise the text above in a few sentences.",
        "What are the main events described in this document?",
        "Explain what the passage says about its central topic.",
    ),
    "zh": (
        "请用几句话概括上面的文章。",
        "这篇文章主要讲了哪些事情？",
        "请说明这段文字的核心内容。",
    ),
}
_TITLE_QUESTION = {"en": "What is the title of this document?", "zh": "这篇文章的标题是什么？"}
_FOLLOW_UPS = {
    "en": ("Can you give more detail?", "Why does that matter?", "Say it more briefly."),
    "zh": ("能再详细一点吗？", "这为什么重要？", "请说得更简短一些。"),
}
_SYSTEM_PROMPTS = {
    "en": ("You are a careful assistant who reads long documents.", "Answer concisely."),
    "zh": ("你是一个认真阅读长文档的助手。", "请简洁地回答。"),
}
_LONGALPACA_FRAMES = {
    "en": (
        "Below is a document. Read it, then answer the question that follows it.",
        "The document ends here.",
    ),
    "zh": ("下面是一篇文档。请阅读后回答文末的问题。", "文档到此结束。"),
}
_EXTRA_INPUTS = {"en": "Answer in at most five sentences.", "zh": "回答不超过五句话。"}
_LONGALIGN_DATASETS = ("synthetic-book", "synthetic-paper", "synthetic-report", "synthetic-qa")


def _pick_lang(rng: random.Random, zh_fraction: float) -> Lang:
    return "zh" if rng.random() < zh_fraction else "en"


def _log_uniform(rng: random.Random, low: int, high: int) -> int:
    """Long-context corpora have a long tail of lengths; log-uniform gives one."""
    return round(math.exp(rng.uniform(math.log(low), math.log(high))))


# Sizes are given in English characters. A Chinese character carries about three English
# characters' worth of text (and tokens), so a zh document of the same size has a third of them.
_CHARS_PER_ENGLISH_CHAR = {"en": 1.0, "zh": 0.35}


def _text(rng: random.Random, lang: Lang, min_chars: int, max_chars: int) -> str:
    scale = _CHARS_PER_ENGLISH_CHAR[lang]
    n_chars = _log_uniform(rng, max(1, int(min_chars * scale)), max(1, int(max_chars * scale)))
    return "\n\n".join(synthetic.document(rng, lang, n_chars))


def _answer(rng: random.Random, lang: Lang) -> str:
    sentences = [synthetic.sentence(rng, lang) for _ in range(rng.randint(1, 6))]
    return synthetic.sentence_separator(lang).join(sentences)


def _document_task(
    rng: random.Random, lang: Lang, min_chars: int, max_chars: int
) -> tuple[str, str, str]:
    """A titled long document, a question about it and its answer."""
    title = synthetic.topic_title(rng, lang)
    document = f"{title}\n\n{_text(rng, lang, min_chars, max_chars)}"
    if rng.random() < 0.2:
        return document, _TITLE_QUESTION[lang], title
    return document, rng.choice(_QUESTIONS[lang]), _answer(rng, lang)


def _rough_token_count(text: str) -> int:
    """Stands in for the token count real rows store in ``length`` (about 4 chars/token in
    English, 1.5 in Chinese); nothing should rely on its exact value."""
    cjk = sum(1 for ch in text if "\u4e00" <= ch <= "\u9fff")
    return round((len(text) - cjk) / 4 + cjk / 1.5)


def _write_jsonl(path: Path, rows: Iterable[Row]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def _longalign_row(
    rng: random.Random, index: int, lang: Lang, min_chars: int, max_chars: int
) -> Row:
    document, question, answer = _document_task(rng, lang, min_chars, max_chars)
    messages = []
    if rng.random() < 0.15:
        messages.append({"role": "system", "content": rng.choice(_SYSTEM_PROMPTS[lang])})
    messages.append({"role": "user", "content": f"{document}\n\n{question}"})
    messages.append({"role": "assistant", "content": answer})
    if rng.random() < 0.1:
        messages.append({"role": "user", "content": rng.choice(_FOLLOW_UPS[lang])})
        messages.append({"role": "assistant", "content": _answer(rng, lang)})
    return {
        "messages": messages,
        "dataset": rng.choice(_LONGALIGN_DATASETS),
        "id": f"{index:05d}-{rng.getrandbits(48):012x}",
        "length": _rough_token_count("".join(m["content"] for m in messages)),
    }


def write_longalign(
    path: str | Path,
    n: int,
    *,
    seed: int,
    min_chars: int = 4_000,
    max_chars: int = 40_000,
    zh_fraction: float = 0.1,
) -> Path:
    """LongAlign-10k layout: JSONL of ``{"messages", "dataset", "id", "length"}``; some rows open
    with a system message, a few continue for a second user/assistant exchange."""
    rng = random.Random(seed)
    rows = (
        _longalign_row(rng, i, _pick_lang(rng, zh_fraction), min_chars, max_chars) for i in range(n)
    )
    return _write_jsonl(Path(path), rows)


def _longalpaca_row(
    rng: random.Random, index: int, lang: Lang, min_chars: int, max_chars: int
) -> Row:
    document, question, answer = _document_task(rng, lang, min_chars, max_chars)
    opening, closing = _LONGALPACA_FRAMES[lang]
    roll = rng.random()
    # Mostly "", sometimes an extra instruction, occasionally null: all three occur in practice.
    extra_input = _EXTRA_INPUTS[lang] if roll < 0.1 else None if roll < 0.15 else ""
    return {
        "instruction": f"{opening}\n{document}\n{closing}\n{question}",
        "input": extra_input,
        "output": answer,
        "file": f"sample_{index:05d}.txt",
    }


def write_longalpaca(
    path: str | Path,
    n: int,
    *,
    seed: int,
    min_chars: int = 4_000,
    max_chars: int = 40_000,
    zh_fraction: float = 0.1,
) -> Path:
    """LongAlpaca-12k layout: ONE JSON array of ``{"instruction", "input", "output", "file"}``,
    the long document embedded in ``instruction``."""
    rng = random.Random(seed)
    rows = [
        _longalpaca_row(rng, i, _pick_lang(rng, zh_fraction), min_chars, max_chars)
        for i in range(n)
    ]
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8", newline="\n") as f:
        json.dump(rows, f, ensure_ascii=False, indent=2)
        f.write("\n")
    return out


def _chat(rng: random.Random, lang: Lang, min_chars: int, max_chars: int) -> list[tuple[str, str]]:
    """A short generic chat as ``(role, content)`` pairs: optional system, 1-3 exchanges."""
    turns = []
    if rng.random() < 0.2:
        turns.append(("system", rng.choice(_SYSTEM_PROMPTS[lang])))
    for _ in range(rng.randint(1, 3)):
        turns.append(("user", _text(rng, lang, min_chars, max_chars)))
        turns.append(("assistant", _answer(rng, lang)))
    return turns


_SHAREGPT_ROLES = {"system": "system", "user": "human", "assistant": "gpt"}


def write_sharegpt(
    path: str | Path,
    n: int,
    *,
    seed: int,
    min_chars: int = 100,
    max_chars: int = 2_000,
    zh_fraction: float = 0.1,
) -> Path:
    """ShareGPT layout: JSONL of ``{"id", "conversations": [{"from", "value"}]}``."""
    rng = random.Random(seed)

    def rows() -> Iterable[Row]:
        for i in range(n):
            turns = _chat(rng, _pick_lang(rng, zh_fraction), min_chars, max_chars)
            conversations = [{"from": _SHAREGPT_ROLES[r], "value": c} for r, c in turns]
            yield {"id": f"sharegpt-{i:05d}", "conversations": conversations}

    return _write_jsonl(Path(path), rows())


def write_alpaca(
    path: str | Path,
    n: int,
    *,
    seed: int,
    min_chars: int = 100,
    max_chars: int = 2_000,
    zh_fraction: float = 0.1,
) -> Path:
    """Alpaca layout: JSONL of ``{"instruction", "input", "output"}``; about half the rows put
    the text in ``input``, the rest leave it empty."""
    rng = random.Random(seed)

    def rows() -> Iterable[Row]:
        for _ in range(n):
            lang = _pick_lang(rng, zh_fraction)
            text = _text(rng, lang, min_chars, max_chars)
            question = rng.choice(_QUESTIONS[lang])
            if rng.random() < 0.5:
                instruction, extra_input = question, text
            else:
                instruction, extra_input = f"{text}\n\n{question}", ""
            yield {"instruction": instruction, "input": extra_input, "output": _answer(rng, lang)}

    return _write_jsonl(Path(path), rows())


_MESSAGES_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
    ]
)


def write_messages_parquet(
    path: str | Path,
    n: int,
    *,
    seed: int,
    min_chars: int = 100,
    max_chars: int = 2_000,
    zh_fraction: float = 0.1,
) -> Path:
    """Parquet with columns ``id`` and ``messages: list<struct<role, content>>``."""
    rng = random.Random(seed)
    ids, conversations = [], []
    for i in range(n):
        turns = _chat(rng, _pick_lang(rng, zh_fraction), min_chars, max_chars)
        ids.append(f"messages-{i:05d}")
        conversations.append([{"role": r, "content": c} for r, c in turns])
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"id": ids, "messages": conversations}, schema=_MESSAGES_SCHEMA)
    pq.write_table(table, out)
    return out


_TEXT_COLLECTIONS = ("synthetic-books", "synthetic-papers", "synthetic-code-docs", "synthetic-web")
_REPOST_NOTES = {
    "en": ("Reposted from the archive.", "Mirror copy; the original is linked below."),
    "zh": ("转载自档案馆。", "镜像副本，原文链接见下。"),
}
NEAR_DUPLICATE_FRACTION = 0.12


def write_text(
    path: str | Path,
    n: int,
    *,
    seed: int,
    min_chars: int = 4_000,
    max_chars: int = 40_000,
    zh_fraction: float = 0.1,
) -> Path:
    """Pretraining-corpus layout (RedPajama / Dolma style): JSONL of ``{"text", "id", "meta"}``,
    one titled long document per row. Like crawled corpora, about ``NEAR_DUPLICATE_FRACTION`` of
    the rows re-publish an earlier document with a note added before and after it (a mirror):
    near duplicates, not exact ones, for the near-duplicate filter to find."""
    rng = random.Random(seed)

    def rows() -> Iterable[Row]:
        published: list[tuple[Lang, str]] = []
        for i in range(n):
            if published and rng.random() < NEAR_DUPLICATE_FRACTION:
                lang, original = rng.choice(published)
                before, after = _REPOST_NOTES[lang]
                text, collection = f"{before}\n\n{original}\n\n{after}", "synthetic-mirror"
            else:
                lang = _pick_lang(rng, zh_fraction)
                title = synthetic.topic_title(rng, lang)
                text = f"{title}\n\n{_text(rng, lang, min_chars, max_chars)}"
                collection = rng.choice(_TEXT_COLLECTIONS)
                published.append((lang, text))
            yield {
                "text": text,
                "id": f"doc-{i:05d}",
                "meta": {"collection": collection, "lang": lang},
            }

    return _write_jsonl(Path(path), rows())


class SampleSchema(NamedTuple):
    writer: Callable[..., Path]
    suffix: str


# ``builtin:sample/<name>`` in a recipe resolves through this table.
SAMPLE_SCHEMAS: dict[str, SampleSchema] = {
    "longalign": SampleSchema(write_longalign, ".jsonl"),
    "longalpaca": SampleSchema(write_longalpaca, ".json"),
    "sharegpt": SampleSchema(write_sharegpt, ".jsonl"),
    "alpaca": SampleSchema(write_alpaca, ".jsonl"),
    "messages_parquet": SampleSchema(write_messages_parquet, ".parquet"),
    "text": SampleSchema(write_text, ".jsonl"),
}
