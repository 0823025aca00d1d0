"""Offline data generation: filler text, sample files, anti-haystack tasks, quickstart tokenizer."""

from __future__ import annotations

import json
import random
import re

import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from longdata.records import validate_messages
from longdata.sources import antihaystack, samples, synthetic
from longdata.tokenizer_assets import ASSET_DIR, BOS, CHAT_TEMPLATE, EOT, PAD, VOCAB_SIZE

CJK = re.compile(r"[\u4e00-\u9fff]")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(ASSET_DIR), local_files_only=True)


@pytest.fixture(scope="module")
def count_tokens(tokenizer):
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


# --- synthetic text -------------------------------------------------------------------------


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_document_is_deterministic_and_seed_dependent(lang):
    first = synthetic.document(random.Random(1), lang, 5_000)
    assert first == synthetic.document(random.Random(1), lang, 5_000)
    assert first != synthetic.document(random.Random(2), lang, 5_000)
    assert len("\n\n".join(first)) >= 5_000


def test_english_sentences_look_like_prose():
    rng = random.Random(0)
    for _ in range(200):
        s = synthetic.en_sentence(rng)
        assert s[0].isupper() and s[-1] in ".?" and "  " not in s
    lengths = {len(synthetic.en_sentence(rng).split()) for _ in range(200)}
    assert max(lengths) - min(lengths) >= 10, "sentence lengths should vary"


def test_chinese_text_uses_chinese_characters_and_punctuation():
    text = "".join(synthetic.document(random.Random(0), "zh", 3_000))
    assert len(CJK.findall(text)) > 0.8 * len(text.replace("\n", ""))
    assert "，" in text and "。" in text and not re.search(r"[A-Za-z]", text)


def test_marker_words_never_occur_in_filler():
    en_filler = set(
        synthetic.EN_NOUNS + synthetic.EN_VERBS + synthetic.EN_ADJECTIVES + synthetic.EN_ADVERBS
    )
    assert not en_filler & set(synthetic.MARKER_ADJECTIVES_EN + synthetic.MARKER_NOUNS_EN)
    zh_filler_chars = set(
        "".join(synthetic.ZH_SUBJECTS + synthetic.ZH_ADVERBS + synthetic.ZH_VERBS)
        + "".join(synthetic.ZH_ADJECTIVES + synthetic.ZH_NOUNS + synthetic.ZH_CONNECTIVES)
        + "".join(synthetic.ZH_OPENERS)
    )
    zh_markers = "".join(synthetic.MARKER_ADJECTIVES_ZH + synthetic.MARKER_NOUNS_ZH) + "秘密代码"
    assert not zh_filler_chars & set(zh_markers)


# --- sample files ---------------------------------------------------------------------------

SMALL = {"min_chars": 300, "max_chars": 3_000}


@pytest.mark.parametrize("name", sorted(samples.SAMPLE_SCHEMAS))
def test_sample_files_are_byte_identical_for_a_seed(tmp_path, name):
    writer, suffix = samples.SAMPLE_SCHEMAS[name]
    a = writer(tmp_path / f"a{suffix}", 8, seed=3, **SMALL)
    b = writer(tmp_path / f"b{suffix}", 8, seed=3, **SMALL)
    c = writer(tmp_path / f"c{suffix}", 8, seed=4, **SMALL)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def _jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_longalign_rows_match_the_public_schema(tmp_path):
    path = samples.write_longalign(
        tmp_path / "la.jsonl", 80, seed=0, min_chars=1_000, max_chars=4_000, zh_fraction=0.3
    )
    rows = _jsonl(path)
    assert len(rows) == 80
    for row in rows:
        assert set(row) == {"messages", "dataset", "id", "length"}
        assert isinstance(row["length"], int) and isinstance(row["id"], str)
        roles = [m["role"] for m in row["messages"]]
        if roles[0] == "system":
            roles = roles[1:]
        assert roles in (["user", "assistant"], ["user", "assistant"] * 2)
        assert all(set(m) == {"role", "content"} for m in row["messages"])
        long_turn = next(m for m in row["messages"] if m["role"] == "user")["content"]
        # Sizes are in English characters; Chinese documents hold about a third as many.
        assert len(long_turn) >= (350 if CJK.search(long_turn) else 1_000)
    assert any(r["messages"][0]["role"] == "system" for r in rows)
    assert any(len(r["messages"]) >= 4 for r in rows)
    zh_rows = [r for r in rows if CJK.search(r["messages"][-1]["content"])]
    assert 10 <= len(zh_rows) <= 40


def test_longalpaca_is_one_json_array_with_the_document_in_the_instruction(tmp_path):
    path = samples.write_longalpaca(tmp_path / "lp.json", 60, seed=0, **SMALL)
    rows = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(rows, list) and len(rows) == 60
    for row in rows:
        assert set(row) == {"instruction", "input", "output", "file"}
        assert len(row["instruction"]) >= SMALL["min_chars"]
        assert row["input"] is None or isinstance(row["input"], str)
        assert row["output"] and row["file"]
    assert any(row["input"] for row in rows), "some rows carry a non-empty input"
    assert any(row["input"] == "" for row in rows)


def test_sharegpt_alpaca_and_parquet_schemas(tmp_path):
    for row in _jsonl(samples.write_sharegpt(tmp_path / "s.jsonl", 20, seed=0)):
        assert set(row) == {"id", "conversations"}
        speakers = [turn["from"] for turn in row["conversations"]]
        if speakers[0] == "system":
            speakers = speakers[1:]
        assert speakers == ["human", "gpt"] * (len(speakers) // 2) and speakers
        assert all(set(turn) == {"from", "value"} for turn in row["conversations"])
    for row in _jsonl(samples.write_alpaca(tmp_path / "a.jsonl", 20, seed=0)):
        assert set(row) == {"instruction", "input", "output"}
        assert all(isinstance(v, str) for v in row.values())
    table = pq.read_table(samples.write_messages_parquet(tmp_path / "m.parquet", 20, seed=0))
    assert table.column_names == ["id", "messages"] and table.num_rows == 20
    for conversation in table.column("messages").to_pylist():
        assert conversation[-1]["role"] == "assistant"
        assert {m["role"] for m in conversation} <= {"system", "user", "assistant"}


def test_sample_registry_names_and_suffixes():
    suffixes = {name: schema.suffix for name, schema in samples.SAMPLE_SCHEMAS.items()}
    assert suffixes == {
        "longalign": ".jsonl",
        "longalpaca": ".json",
        "sharegpt": ".jsonl",
        "alpaca": ".jsonl",
        "messages_parquet": ".parquet",
        "text": ".jsonl",
    }


# --- anti-haystack --------------------------------------------------------------------------

HAYSTACK = {"min_tokens": 600, "max_tokens": 4_000, "zh_fraction": 0.3}


@pytest.fixture(scope="module")
def haystack(count_tokens):
    return list(antihaystack.generate(count=40, seed=11, count_tokens=count_tokens, **HAYSTACK))


def test_antihaystack_is_deterministic(haystack, count_tokens):
    again = list(antihaystack.generate(count=5, seed=11, count_tokens=count_tokens, **HAYSTACK))
    other = list(antihaystack.generate(count=5, seed=12, count_tokens=count_tokens, **HAYSTACK))
    assert again == haystack[:5]
    assert [c.messages for c in other] != [c.messages for c in again]


def test_antihaystack_records_are_valid_and_traceable(haystack):
    for index, conversation in enumerate(haystack):
        validate_messages(conversation.messages)
        assert [m.role for m in conversation.messages] == ["user", "assistant"]
        assert conversation.location == f"antihaystack[{index}]"
        assert conversation.meta["task"] in ("needle", "paragraph")
        assert conversation.meta["lang"] in ("en", "zh")
    assert {c.meta["task"] for c in haystack} == {"needle", "paragraph"}
    assert {c.meta["lang"] for c in haystack} == {"en", "zh"}


def test_lengths_land_within_three_percent_of_target(haystack, count_tokens):
    for conversation in haystack:
        target = int(conversation.meta["target_tokens"])
        assert HAYSTACK["min_tokens"] <= target <= HAYSTACK["max_tokens"]
        user, answer = (m.content for m in conversation.messages)
        actual = count_tokens(user) + count_tokens(answer)
        assert abs(actual - target) <= 0.03 * target, (target, actual)


NEEDLE_EN = re.compile(r"The secret code of the ([a-z]+ [a-z]+) is (\d+)\.")
NEEDLE_ZH = re.compile(r"(\w+?)的秘密代码是(\d+)。")


def test_needles_are_in_the_document_at_the_requested_depths(haystack):
    needles = [c for c in haystack if c.meta["task"] == "needle"]
    assert len(needles) >= 10
    for conversation in needles:
        user, answer = (m.content for m in conversation.messages)
        document, question = user.rsplit("\n\n", 1)
        pattern = NEEDLE_EN if conversation.meta["lang"] == "en" else NEEDLE_ZH
        facts = pattern.findall(answer)
        requested = [float(d) for d in conversation.meta["requested_depths"].split(",")]
        assert len(facts) == len(requested) >= 1
        # The answer lists the facts in the order their depths were drawn.
        for match, depth in zip(pattern.finditer(answer), requested):
            sentence, subject, code = match.group(0), match.group(1), match.group(2)
            assert document.count(sentence) == 1
            assert subject in question and code not in question
            assert abs(document.index(sentence) / len(document) - depth) < 0.05


def test_paragraph_answers_point_at_the_paragraph_with_the_phrase(haystack):
    tasks = [c for c in haystack if c.meta["task"] == "paragraph"]
    assert len(tasks) >= 10
    for conversation in tasks:
        user, answer = (m.content for m in conversation.messages)
        document, question = user.rsplit("\n\n", 1)
        if conversation.meta["lang"] == "en":
            phrase = re.fullmatch(r"Which paragraph mentions the (.+)\? .*", question).group(1)
            number = int(re.fullmatch(r"Paragraph (\d+)", answer).group(1))
            label = re.compile(r"Paragraph (\d+): ")
        else:
            phrase = re.fullmatch(r"哪一段提到了(.+?)？.*", question).group(1)
            number = int(re.fullmatch(r"第(\d+)段", answer).group(1))
            label = re.compile(r"第(\d+)段：")
        paragraphs = document.split("\n\n")
        assert [int(label.match(p).group(1)) for p in paragraphs] == list(
            range(1, len(paragraphs) + 1)
        )
        holders = [i + 1 for i, p in enumerate(paragraphs) if phrase in p]
        assert holders == [number]


def test_chinese_tasks_are_in_chinese(haystack):
    for conversation in haystack:
        user, answer = (m.content for m in conversation.messages)
        question = user.rsplit("\n\n", 1)[1]
        is_zh = conversation.meta["lang"] == "zh"
        assert bool(CJK.search(question)) == is_zh
        assert bool(CJK.search(answer)) == is_zh
        if is_zh:
            assert len(CJK.findall(user)) > 0.5 * len(user)


def test_single_language_and_bad_arguments(count_tokens):
    only_zh = antihaystack.generate(
        count=3,
        min_tokens=300,
        max_tokens=400,
        languages=("zh",),
        seed=0,
        count_tokens=count_tokens,
    )
    assert {c.meta["lang"] for c in only_zh} == {"zh"}
    with pytest.raises(ValueError):
        next(antihaystack.generate(count=1, min_tokens=10, max_tokens=5, seed=0, count_tokens=len))
    with pytest.raises(ValueError):
        next(
            antihaystack.generate(
                count=1, min_tokens=5, max_tokens=10, tasks=("essay",), seed=0, count_tokens=len
            )
        )


# --- quickstart tokenizer -------------------------------------------------------------------


def test_tokenizer_assets_are_small_and_loadable_offline(tokenizer, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert sum(f.stat().st_size for f in ASSET_DIR.iterdir()) < 2_000_000
    assert {f.name for f in ASSET_DIR.iterdir()} >= {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
    assert tokenizer.is_fast and len(tokenizer) == VOCAB_SIZE
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (BOS, EOT, PAD)
    for special in (
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
        "<|pad|>",
    ):
        assert len(tokenizer.encode(special, add_special_tokens=False)) == 1


@pytest.mark.parametrize(
    "text",
    [
        "The quick brown fox jumps over 13 lazy dogs.\n\n  Indented, tabs\tand trailing space ",
        "研究人员说明漫长的道路。他们讨论了新的计划，而且大家都同意。",
        "Mixed: café naïve Ünïcödé 日本語 한국어 🎉🚀 — «quotes» and emoji",
    ],
)
def test_tokenizer_round_trips_any_text(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert tokenizer.unk_token_id is None or tokenizer.unk_token_id not in ids


def test_tokenizer_compresses_the_synthetic_languages(tokenizer):
    for lang, minimum in (("en", 4.0), ("zh", 1.5)):
        text = "\n\n".join(synthetic.document(random.Random(5), lang, 20_000))
        assert len(text) / len(tokenizer.encode(text, add_special_tokens=False)) > minimum


def test_chat_template_renders_llama3_style(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi  there\n"},
        {"role": "assistant", "content": "Hello!"},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi  there\n<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
    )
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    # No {% generation %} block: the pipeline must build assistant masks from offsets.
    assert not re.search(r"\{%-?\s*generation", tokenizer.chat_template)
    assert tokenizer.chat_template == CHAT_TEMPLATE

    ids = tokenizer(rendered)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer("plain text")["input_ids"][0] != tokenizer.bos_token_id


# --- real-text haystacks --------------------------------------------------------------------

ESSAY_TEMPLATES = (
    "In essay {i} the author argues that founders should talk to users every week.",
    "Draft {i} was rewritten because the second paragraph wandered off topic!",
    "Why does chapter {i} keep returning to the question of taste?",
    "The notes for lecture {i} describe how programmers learn by building things.",
    "Reader letter {i} asked whether ambition can be taught at all.",
)


def essay_text(paragraphs: int = 60) -> str:
    """Prose in a vocabulary the generator never uses, so filler provenance can be checked."""
    lines, i = [], 0
    for p in range(paragraphs):
        sentences = []
        for _ in range(3 + p % 4):
            sentences.append(ESSAY_TEMPLATES[i % len(ESSAY_TEMPLATES)].format(i=i))
            i += 1
        lines.append(" ".join(sentences))
    return "\n\n".join(lines)


@pytest.fixture(scope="module")
def essay(tmp_path_factory):
    path = tmp_path_factory.mktemp("haystack") / "essays.txt"
    path.write_text(essay_text(), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def real_haystack(essay):
    return antihaystack.Haystack.from_paths([essay])


REAL = {"min_tokens": 800, "max_tokens": 3_000, "tasks": ("needle",), "needles": (1, 2)}


def test_haystack_filler_comes_from_the_haystack_file(real_haystack, count_tokens):
    essay_sentences = set(real_haystack.sentences["en"])
    for conversation in antihaystack.generate(
        count=6, seed=5, count_tokens=count_tokens, haystack=real_haystack, **REAL
    ):
        user, answer = (m.content for m in conversation.messages)
        document = user.rsplit("\n\n", 1)[0]
        needles = {m.group(0) for m in NEEDLE_EN.finditer(answer)}
        sentences = [s for p in document.split("\n\n") for s in re.split(r"(?<=[.!?]) ", p)]
        filler = [s for s in sentences if s not in needles]
        assert needles and filler and all(s in essay_sentences for s in filler)
        assert conversation.meta["lang"] == "en"  # the haystack has no Chinese text


def test_haystack_needles_sit_at_the_requested_token_depth(real_haystack, count_tokens):
    items = list(
        antihaystack.generate(
            count=8, seed=6, count_tokens=count_tokens, haystack=real_haystack, **REAL
        )
    )
    for conversation in items:
        user, answer = (m.content for m in conversation.messages)
        document = user.rsplit("\n\n", 1)[0]
        target = int(conversation.meta["target_tokens"])
        assert abs(count_tokens(user) + count_tokens(answer) - target) <= 0.03 * target
        total = count_tokens(document)
        requested = [float(d) for d in conversation.meta["requested_depths"].split(",")]
        for match, depth in zip(NEEDLE_EN.finditer(answer), requested):
            assert document.count(match.group(0)) == 1
            token_depth = count_tokens(document[: document.index(match.group(0))]) / total
            assert abs(token_depth - depth) < 0.05, (token_depth, depth)


def test_haystack_items_are_deterministic_by_seed(real_haystack, count_tokens):
    def items(seed):
        return [
            c.messages
            for c in antihaystack.generate(
                count=3, seed=seed, count_tokens=count_tokens, haystack=real_haystack, **REAL
            )
        ]

    assert items(7) == items(7)
    assert items(7) != items(8)


def test_marker_phrases_the_haystack_contains_are_never_planted(count_tokens):
    every_phrase = [
        f"{a} {n}" for a in synthetic.MARKER_ADJECTIVES_EN for n in synthetic.MARKER_NOUNS_EN
    ]
    taken = every_phrase[:-3]  # the haystack mentions all but three marker phrases
    text = essay_text(20) + "\n\n" + " ".join(f"We saw the {p} today." for p in taken)
    haystack = antihaystack.Haystack.from_texts([text])
    for conversation in antihaystack.generate(
        count=10,
        seed=1,
        count_tokens=count_tokens,
        haystack=haystack,
        min_tokens=300,
        max_tokens=600,
        tasks=antihaystack.TASKS,
    ):
        question = conversation.messages[0].content.rsplit("\n\n", 1)[1]
        assert not any(p in question for p in taken)
        assert any(p in question for p in every_phrase[-3:])


def test_haystack_without_text_or_language_is_refused(count_tokens, tmp_path):
    with pytest.raises(ValueError, match="no text"):
        antihaystack.Haystack.from_texts(["   \n\n  "])
    english = antihaystack.Haystack.from_texts([essay_text(3)])
    with pytest.raises(ValueError, match="no text in any allowed language"):
        next(
            antihaystack.generate(
                count=1,
                min_tokens=100,
                max_tokens=200,
                languages=("zh",),
                seed=0,
                count_tokens=count_tokens,
                haystack=english,
            )
        )
    with pytest.raises(FileNotFoundError, match="no such file"):
        antihaystack.Haystack.from_paths([tmp_path / "missing.txt"])


def test_niah_prompts_over_a_haystack(tokenizer, real_haystack):
    from longdata.evals.niah import prompts as niah

    prompt = niah.build_prompt(tokenizer, length=1024, depth=0.5, sample=0, haystack=real_haystack)
    assert 1024 - niah.length_slack(1024) <= prompt.prompt_tokens <= 1024
    text = tokenizer.decode(prompt.prompt_ids)
    assert prompt.answer in text and "In essay" in text
    assert abs(prompt.measured_depth - 0.5) < 0.05
    again = niah.build_prompt(tokenizer, length=1024, depth=0.5, sample=0, haystack=real_haystack)
    assert again.prompt_ids == prompt.prompt_ids
    generated = niah.build_prompt(tokenizer, length=1024, depth=0.5, sample=0)
    assert "In essay" not in tokenizer.decode(generated.prompt_ids)
