"""RULER-style task families: answers recoverable from the prompt, lengths, seeds, scoring."""

from __future__ import annotations

import json
import math
import random
import re
import statistics
from collections import Counter
from pathlib import Path

import pytest
from transformers import AutoTokenizer
from typer.testing import CliRunner

from longdata.cli import app
from longdata.records import validate_messages
from longdata.sources import antihaystack, ruler, synthetic
from longdata.tokenizer_assets import ASSET_DIR
from longdata.trainer import load_model

SETTINGS = {"min_tokens": 600, "max_tokens": 2_000, "zh_fraction": 0.4}
COUNT = 60


@pytest.fixture(scope="module")
def count_tokens():
    tokenizer = AutoTokenizer.from_pretrained(str(ASSET_DIR), local_files_only=True)
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.fixture(scope="module")
def items(count_tokens):
    return list(
        antihaystack.generate(
            count=COUNT, seed=5, tasks=ruler.TASKS, count_tokens=count_tokens, **SETTINGS
        )
    )


# The items of each task's answer sentence (the rest restates the question).
ANSWER_ITEMS = {
    ("multikey", "en"): r"The secret code of the [a-z]+ [a-z]+ is (.+)\.",
    ("multikey", "zh"): r"\w+?的秘密代码是(.+)。",
    ("multivalue", "en"): r"The secret codes of the [a-z]+ [a-z]+ are (.+)\.",
    ("multivalue", "zh"): r"\w+?的秘密代码是(.+)。",
    ("vartrack", "en"): r"The variables assigned the value \d+ are (.+)\.",
    ("vartrack", "zh"): r"值为\d+的变量是(.+)。",
    ("cwe", "en"): r"The keywords that occur most often are (.+)\.",
    ("cwe", "zh"): r"出现次数最多的关键词是(.+)。",
    ("qa", "en"): r"The [a-z]+ [a-z]+ was made in the town of (.+)\.",
    ("qa", "zh"): r"\w+?是在(.+)制作的。",
}


def _split(task: str, lang: str, answer: str) -> list[str]:
    items = re.fullmatch(ANSWER_ITEMS[task, lang], answer)
    assert items, (task, lang, answer)
    return re.split(r", |、", items.group(1))


def _resolve_variables(prompt: str, value: str) -> set[str]:
    assignments = dict(re.findall(r"VAR ([A-Z]{5}) = (\d+|VAR [A-Z]{5})", prompt))

    def value_of(name: str) -> str:
        right = assignments[name]
        return value_of(right[4:]) if right.startswith("VAR ") else right

    return {name for name in assignments if value_of(name) == value}


def recompute(task: str, lang: str, prompt: str) -> set[str]:
    """The answer, worked out from the prompt text alone."""
    document, question = prompt.rsplit("\n\n", 1)
    if task in ("multikey", "multivalue"):
        if lang == "en":
            subject = re.search(r"codes? of the ([a-z]+ [a-z]+)\?", question).group(1)
            pattern = rf"(?:The|One of the) secret codes? of the {subject} is (\d+)\."
        else:
            subject = re.match(r"(\w+?)的", question).group(1)
            pattern = rf"{subject}的秘密代码(?:之一)?是(\d+)。"
        return set(re.findall(pattern, document))
    if task == "vartrack":
        return _resolve_variables(document, re.search(r"\d+", question).group(0))
    if task == "cwe":
        pattern = r"Keyword: ([a-z]+ [a-z]+)\." if lang == "en" else r"关键词：(\w+?)。"
        counts = Counter(re.findall(pattern, document)).most_common()
        top = [word for word, _ in counts[: ruler.CWE_TOP]]
        assert counts[ruler.CWE_TOP - 1][1] > counts[ruler.CWE_TOP][1]  # no tie at the cut
        return set(top)
    assert task == "qa"
    if lang == "en":
        subject = re.search(r"was the ([a-z]+ [a-z]+) made", question).group(1)
        return set(re.findall(rf"The {subject} was made in the town of ([A-Z][a-z]+)", document))
    subject = re.match(r"(\w+?)是在", question).group(1)
    return set(re.findall(rf"{subject}是\d+年在(\w+?镇)制作的", document))


def test_every_task_and_language_is_generated(items):
    assert {c.meta["task"] for c in items} == set(ruler.TASKS)
    for task in ruler.TASKS:
        assert {c.meta["lang"] for c in items if c.meta["task"] == task} == {"en", "zh"}, task


def test_answers_are_recoverable_exactly_from_the_prompt(items):
    for conversation in items:
        validate_messages(conversation.messages)
        prompt, answer = (m.content for m in conversation.messages)
        meta = conversation.meta
        items = _split(meta["task"], meta["lang"], answer)
        assert recompute(meta["task"], meta["lang"], prompt) == set(items), meta


def test_chinese_items_are_in_chinese(items):
    for conversation in items:
        if conversation.meta["lang"] == "zh":
            prompt = conversation.messages[0].content
            assert len(re.findall(r"[\u4e00-\u9fff]", prompt)) > len(prompt) / 3


def test_lengths_fit_like_antihaystack(items, count_tokens):
    for conversation in items:
        target = int(conversation.meta["target_tokens"])
        prompt, answer = (m.content for m in conversation.messages)
        actual = count_tokens(prompt) + count_tokens(answer)
        assert abs(actual - target) <= 0.03 * target, (conversation.meta, actual)


def test_same_seed_same_bytes_other_seed_other_bytes(items, count_tokens):
    def first(seed):
        return list(
            antihaystack.generate(
                count=6, seed=seed, tasks=ruler.TASKS, count_tokens=count_tokens, **SETTINGS
            )
        )

    assert first(5) == items[:6]
    assert [c.messages for c in first(6)] != [c.messages for c in items[:6]]


def test_needle_and_paragraph_output_is_unchanged_by_the_new_tasks(count_tokens):
    """Adding task families must not move the rng stream of the existing ones."""
    default = list(antihaystack.generate(count=8, seed=3, count_tokens=count_tokens, **SETTINGS))
    explicit = list(
        antihaystack.generate(
            count=8,
            seed=3,
            tasks=("needle", "paragraph"),
            count_tokens=count_tokens,
            **SETTINGS,
        )
    )
    assert default == explicit
    assert {c.meta["task"] for c in default} <= {"needle", "paragraph"}


def test_real_haystack_filler(count_tokens):
    essay = (
        "Rivers carve valleys over many centuries. Farmers follow the water downhill. "
        "Mills were built where the current ran fast.\n\n"
        "In winter the ice closes the harbour. Ships wait for the thaw in the southern bay. "
    ) * 20
    haystack = antihaystack.Haystack.from_texts([essay])
    generated = list(
        antihaystack.generate(
            count=10,
            min_tokens=300,
            max_tokens=800,
            seed=2,
            tasks=ruler.TASKS,
            count_tokens=count_tokens,
            haystack=haystack,
        )
    )
    assert {c.meta["lang"] for c in generated} == {"en"}
    for conversation in generated:
        prompt, answer = (m.content for m in conversation.messages)
        assert "Mills were built" in prompt or "Ships wait" in prompt
        task = conversation.meta["task"]
        assert recompute(task, "en", prompt) == set(_split(task, "en", answer))


@pytest.mark.parametrize("task", ruler.TASKS)
@pytest.mark.parametrize("lang", ["en", "zh"])
def test_control_removes_every_expected_item(task, lang):
    planted = ruler.make_task(random.Random(f"control:{task}:{lang}"), task, lang)
    control = planted.control()
    text = "".join(planted.sentences)
    control_text = "".join(control.sentences)
    assert all(ruler.score([item], [], text) for item in planted.expected)
    assert not any(ruler.score([item], [], control_text) for item in planted.expected)
    assert control.question == planted.question and control.answer == planted.answer


def test_scorer_right_wrong_and_partial():
    assert ruler.score(["48213"], ["11111"], "The code is 48213.") == 1.0
    assert ruler.score(["48213"], ["11111"], "The code is 11111.") == 0.0
    assert ruler.score(["48213"], [], "The code is 482130.") == 0.0  # whole numbers only
    assert ruler.score(["48213"], ["11111"], "48213 or 11111") == 0.0  # a distractor too
    multi = ["12345", "23456", "34567"]
    assert ruler.score(multi, [], "34567, 12345, 23456") == 1.0
    assert ruler.score(multi, [], "12345, 23456") == 0.0  # partial multi-value
    assert ruler.score(["ABCDE", "FGHIJ"], ["KLMNO"], "ABCDE, FGHIJ") == 1.0
    assert ruler.score(["ABCDE", "FGHIJ"], ["KLMNO"], "ABCDEF, FGHIJ") == 0.0
    assert ruler.score(["青石镇"], ["白河镇"], "青石镇") == 1.0
    assert ruler.score(["青石镇"], ["白河镇"], "白河镇") == 0.0


def test_recall_gives_partial_credit_and_ignores_distractors():
    """RULER's metric: the share of the expected items named, matched as `score` matches."""
    multi = ["12345", "23456", "34567"]
    assert ruler.recall(multi, "34567, 12345, 23456") == 1.0
    assert ruler.recall(multi, "12345, 23456") == pytest.approx(2 / 3)
    assert ruler.recall(multi, "12345, 23456, 99999") == pytest.approx(2 / 3)
    assert ruler.recall(["ABCDE", "FGHIJ"], "ABCDE, KLMNO") == 0.5  # a decoy costs nothing
    assert ruler.recall(["48213"], "The code is 482130.") == 0.0  # whole numbers only
    assert ruler.recall(["abcde"], "ABCDE") == 1.0
    assert ruler.recall(["青石镇"], "白河镇") == 0.0


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_chance_is_one_over_the_answers_the_generators_draw(lang):
    """Counted by drawing, not by the formula: every qa town and marker phrase turns up, and
    there are exactly as many as chance assumes (qa's chance is the largest, ~1/121)."""
    rng = random.Random(0)
    towns = {ruler.make_task(rng, "qa", lang).expected[0] for _ in range(3_000)}
    assert len(towns) == round(1 / ruler.chance_accuracy("qa", lang))
    phrases = {synthetic.marker_phrase(rng, lang) for _ in range(20_000)}
    assert math.comb(len(phrases), ruler.CWE_TOP) == round(1 / ruler.chance_accuracy("cwe", lang))
    codes = [int(ruler.make_task(rng, "multikey", lang).expected[0]) for _ in range(500)]
    assert all(code in ruler.CODES for code in codes) and min(codes) < 11_000 < 98_000 < max(codes)
    assert round(1 / ruler.chance_accuracy("multikey", lang)) == len(ruler.CODES) == 90_000
    assert max(ruler.chance_accuracy(task, lang) for task in ruler.TASKS) < 0.01


def test_scorer_agrees_with_generated_answers(items):
    for conversation in items:
        prompt, answer = (m.content for m in conversation.messages)
        meta = conversation.meta
        assert ruler.score(_split(meta["task"], meta["lang"], answer), [], answer) == 1.0


def test_unknown_task_is_one_clear_error():
    with pytest.raises(ValueError, match="tasks must be a non-empty subset"):
        next(
            antihaystack.generate(
                count=1, min_tokens=50, max_tokens=60, seed=0, tasks=("nope",), count_tokens=len
            )
        )


# --- longdata eval ruler ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A random tiny Llama saved with the bundled tokenizer, as `longdata train` saves one."""
    path = tmp_path_factory.mktemp("tiny")
    load_model("tiny-llama", "sdpa_varlen", vocab_size=16_384, seed=0).save_pretrained(path)
    AutoTokenizer.from_pretrained(str(ASSET_DIR)).save_pretrained(path)
    return path


def test_eval_ruler_cli_writes_results_per_task(tmp_path: Path, model_dir: Path) -> None:
    out = tmp_path / "ruler"
    arguments = ["--model", str(model_dir), "--lengths", "512,768", "--samples", "2"]
    result = CliRunner().invoke(
        app, ["eval", "ruler", *arguments, "--max-new-tokens", "4", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert (out / "heatmap.png").read_bytes().startswith(b"\x89PNG")
    results = json.loads((out / "results.json").read_text())
    assert set(results["tasks"]) == set(ruler.TASKS)
    for task, summary in results["tasks"].items():
        rows = [r for r in results["rows"] if r["task"] == task]
        scored = [r["correct"] for r in rows if not r["control"]]
        controls = [r["correct"] for r in rows if r["control"]]
        assert len(scored) == 2 * 2 and len(controls) == 2
        assert summary["accuracy"] == pytest.approx(sum(scored) / len(scored))
        assert summary["control_accuracy"] == pytest.approx(sum(controls) / len(controls))
        assert summary["chance_accuracy"] == ruler.chance_accuracy(task, "en")
        # Recall's values are checked with answers that score it above 0 (the oracle test).
        assert set(summary["by_length"]) == set(summary["recall_by_length"]) == {"512", "768"}
        assert {"recall", "recall_standard_error", "control_recall"} <= set(summary)
    for row in results["rows"]:
        assert row["prompt_tokens"] <= row["length"]
        assert row["key"].startswith("longdata-eval-ruler:0:")
    bad = CliRunner().invoke(app, ["eval", "ruler", *arguments, "--tasks", "nope"])
    assert bad.exit_code != 0 and "Traceback" not in bad.output and "--tasks" in bad.output


def test_eval_scores_a_model_that_answers_right_and_controls_at_chance(count_tokens) -> None:
    """With a generator that returns the expected answer, every scored prompt is correct; the
    controls, built without the signal, carry no expected item in their prompt."""
    from longdata.evals.ruler.run import RulerSpec, build_prompts, run_ruler

    tokenizer = AutoTokenizer.from_pretrained(str(ASSET_DIR))
    spec = RulerSpec(lengths=(512,), samples=2)
    prompts = build_prompts(tokenizer, spec)
    answers = {p.prompt_ids: ", ".join(p.expected) for p in prompts}
    for prompt in prompts:
        text = tokenizer.decode(prompt.prompt_ids)
        assert all(ruler.score([item], [], text) for item in prompt.expected) != prompt.control

    def oracle(ids):
        return tokenizer.encode(answers[tuple(ids)], add_special_tokens=False)

    results = run_ruler(None, tokenizer, spec, generate=oracle)
    for summary in results["tasks"].values():
        assert summary["accuracy"] == 1.0 and summary["standard_error"] == 0.0
        assert summary["control_accuracy"] == 1.0  # the oracle was given the answer; not chance
        assert summary["recall"] == summary["control_recall"] == 1.0
        assert summary["recall_standard_error"] == 0.0
    wrong = run_ruler(None, tokenizer, spec, generate=lambda ids: tokenizer.encode("12345"))
    assert all(summary["accuracy"] == 0.0 for summary in wrong["tasks"].values())
    assert all(summary["recall"] == 0.0 for summary in wrong["tasks"].values())

    def first_item_only(ids):
        return tokenizer.encode(answers[tuple(ids)].split(", ")[0], add_special_tokens=False)

    half = run_ruler(None, tokenizer, spec, generate=first_item_only)
    for task, summary in half["tasks"].items():
        # One length, so one prompt per draw: its recall is 1 / its number of expected items.
        draws = [p for p in prompts if p.task == task and not p.control]
        assert [p.sample for p in draws] == [0, 1]
        per_draw = [1 / len(p.expected) for p in draws]
        assert summary["recall"] == pytest.approx(statistics.mean(per_draw))
        assert summary["recall_by_length"] == {"512": summary["recall"]}
        error = statistics.stdev(per_draw) / math.sqrt(len(per_draw))
        assert summary["recall_standard_error"] == pytest.approx(error)
        assert summary["accuracy"] == pytest.approx(statistics.mean(r == 1 for r in per_draw))


def test_eval_seeds_never_collide_with_recipe_seeds() -> None:
    from longdata.evals.ruler.run import EVAL_NAMESPACE, sample_key
    from longdata.recipe import RecipeError, load_recipe

    key = sample_key(0, "multikey", "en", 3)
    assert key.startswith(f"{EVAL_NAMESPACE}:")
    # Recipe items are keyed "<integer seed>:<index>": no integer renders as the namespace.
    assert not re.fullmatch(r"-?\d+:\d+", key)
    recipe = Path(__file__).parent.parent / "recipes" / "quickstart.yml"
    with pytest.raises(RecipeError, match="seed"):
        load_recipe(recipe, [f"sources[2].seed={EVAL_NAMESPACE}"])
