"""`longdata eval niah` and `longdata eval loss`, and the tokenizer the trainer saves for them."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from transformers import AutoTokenizer
from typer.testing import CliRunner

from longdata.evals import cli as evals_cli
from longdata.evals.niah import prompts as niah
from longdata.evals.niah.decoding import continuation_logprobs, greedy_generate
from longdata.evals.niah.report import format_length
from longdata.evals.niah.scoring import GenerateScorer, LoglikScorer, contains_codes, evaluate
from longdata.format import FORMAT, bind_template_kwargs, tokenizer_digest
from longdata.tokenizer_assets import ASSET_DIR, CHAT_TEMPLATE
from longdata.trainer import cli as trainer_cli
from longdata.trainer import load_model
from longdata.trainer.data import Manifest
from longdata.trainer.validation_loss import default_split, evaluate_loss, length_bucket
from tests.builders import make_row, use_quickstart_tokenizer, write_build

app = typer.Typer()
eval_app = typer.Typer()
eval_app.command("niah")(evals_cli.eval_niah)
eval_app.command("loss")(evals_cli.eval_loss)
app.add_typer(eval_app, name="eval")
app.command("train")(trainer_cli.train)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(ASSET_DIR))


@pytest.fixture(scope="module")
def model():
    return load_model("tiny-llama", "sdpa_varlen", vocab_size=16_384, seed=0).eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, model, tokenizer) -> Path:
    """A random tiny Llama saved as `longdata train` saves one: weights and tokenizer."""
    path = tmp_path_factory.mktemp("model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------
# The prompt grid


def test_parse_lengths_and_depths() -> None:
    assert niah.parse_lengths("8k, 4K,1500,0.5k,1m") == [512, 1500, 4096, 8192, 1_048_576]
    assert niah.parse_depths("1.0,0,25%,0.5") == [0.0, 0.25, 0.5, 1.0]
    for bad in ("4q", "", "4k,4096", "0.3"):
        with pytest.raises(ValueError):
            niah.parse_lengths(bad)
    for bad in ("1.5", "-0.1", "x", "0,0%"):
        with pytest.raises(ValueError):
            niah.parse_depths(bad)
    assert [format_length(n) for n in (4096, 131_072, 1536, 500, 1_048_576)] == [
        "4K",
        "128K",
        "1.5K",
        "500",
        "1M",
    ]


def _haystack_depth(tokenizer, prompt: niah.NiahPrompt) -> float:
    """Where the needle starts in the decoded prompt's haystack, found independently."""
    text = tokenizer.decode(list(prompt.prompt_ids))
    start = text.index("user<|end_header_id|>\n\n") + len("user<|end_header_id|>\n\n")
    end = text.index("\n\n" + prompt.question)
    haystack = text[start:end]
    assert haystack.count(prompt.answer) == 1
    return haystack.index(prompt.answer) / len(haystack)


def test_grid_prompts_have_the_requested_length_and_depth(tokenizer) -> None:
    lengths, depths = [256, 2048], [0.0, 0.5, 1.0]
    prompts = niah.build_grid(tokenizer, lengths, depths, samples_per_cell=2, seed=3)
    assert [(p.length, p.depth, p.sample) for p in prompts] == [
        (n, d, s) for n in lengths for d in depths for s in range(2)
    ]
    for prompt in prompts:
        ids = list(prompt.prompt_ids)
        # Context length = every token the model reads, the template's included.
        assert prompt.length - niah.length_slack(prompt.length) <= len(ids) <= prompt.length
        assert ids == niah.encode(tokenizer, tokenizer.decode(ids))
        text = tokenizer.decode(ids)
        assert text.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>")
        assert text.endswith(
            f"{prompt.question}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        )
        assert prompt.question == (
            f"What is the secret code of the {prompt.subject}? Answer with the number."
        )
        assert prompt.answer == f"The secret code of the {prompt.subject} is {prompt.code}."
        depth = _haystack_depth(tokenizer, prompt)
        assert depth == pytest.approx(prompt.measured_depth, abs=1e-3)
        tolerance = 0.02 if prompt.length >= 2048 else 0.2  # a 256-token haystack is ~10 sentences
        assert abs(depth - prompt.depth) <= tolerance, (prompt.length, prompt.depth, depth)
        assert len(prompt.distractors) == 4 and prompt.code not in prompt.distractor_codes
        assert all(len(str(c)) == len(str(prompt.code)) for c in prompt.distractor_codes)
        answer_tokens = len(niah.encode(tokenizer, prompt.answer))
        assert [len(niah.encode(tokenizer, d)) for d in prompt.distractors] == [answer_tokens] * 4
        assert [str(c) in d for c, d in zip(prompt.distractor_codes, prompt.distractors)] == [
            True
        ] * 4
    # A sample keeps its needle in every cell; samples differ; the grid is reproducible.
    assert len({(p.subject, p.code) for p in prompts if p.sample == 0}) == 1
    assert prompts[0].code != prompts[1].code
    again = niah.build_prompt(tokenizer, length=2048, depth=0.5, sample=1, seed=3)
    assert again == prompts[9]
    other_seed = niah.build_prompt(tokenizer, length=2048, depth=0.5, sample=1, seed=4)
    assert other_seed.prompt_ids != again.prompt_ids


def test_control_prompts_have_no_needle(tokenizer) -> None:
    grid = niah.build_grid(tokenizer, [1024], [0.5], samples_per_cell=2)
    controls = niah.build_controls(tokenizer, 1024, 2)
    for planted, control in zip(grid, controls, strict=True):
        text = tokenizer.decode(list(control.prompt_ids))
        assert not control.planted and control.measured_depth is None
        start = text.index("user<|end_header_id|>\n\n") + len("user<|end_header_id|>\n\n")
        haystack = text[start : text.index("\n\n" + planted.question)]
        assert len(haystack) > 2000 and "secret code" not in haystack
        assert str(control.code) not in text
        assert text.endswith(
            f"{planted.question}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        )
        assert 1024 - niah.length_slack(1024) <= control.prompt_tokens <= 1024
        assert (control.answer, control.distractors) == (planted.answer, planted.distractors)


def test_too_short_a_length_is_refused(tokenizer) -> None:
    with pytest.raises(ValueError, match="cannot fit"):
        niah.build_prompt(tokenizer, length=20, depth=0.5, sample=0)


def test_prompt_and_answer_split_where_training_splits_them(tokenizer) -> None:
    """The prompt ends with the generation prompt; a template that ignores add_generation_prompt
    trains its assistant header as target, so the scored answer starts with the header."""
    user = "Hello there."
    expected = tokenizer.apply_chat_template(
        [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
    )
    assert niah.generation_prompt(tokenizer, user) == expected
    assert expected.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert niah.answer_frame(tokenizer, user) == ("", "<|eot_id|>")

    plain = AutoTokenizer.from_pretrained(str(ASSET_DIR))
    plain.chat_template = CHAT_TEMPLATE.split("{%- if add_generation_prompt %}")[0]
    rendered = plain.apply_chat_template(
        [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
    )
    assert not rendered.endswith("assistant<|end_header_id|>\n\n")  # the flag is ignored
    assert niah.generation_prompt(plain, user) == rendered
    assert niah.answer_frame(plain, user) == (
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "<|eot_id|>",
    )

    broken = AutoTokenizer.from_pretrained(str(ASSET_DIR))
    broken.chat_template = "{% for m in messages %}{{ m['content'] | lower }}{% endfor %}"
    with pytest.raises(ValueError, match="cannot tell where the answer starts"):
        niah.answer_frame(broken, user)


NEEDLE_PATTERNS = (
    re.compile(r"The secret code of the ([a-z]+ [a-z]+) is (\d+)\."),
    re.compile(r"([^。，]+?)的秘密代码是(\d+)。"),
)


def _quickstart_training_needles() -> set[tuple[str, int]]:
    """(subject, code) of every needle the quickstart recipe's anti-haystack source plants.

    A task's subjects and codes are drawn before its filler is fitted, so a cheap token count
    yields the same needles as the build's tokenizer (checked on item 0).
    """
    from longdata.recipe import AntiHaystackSource, load_recipe
    from longdata.sources import antihaystack

    recipe = load_recipe(Path(__file__).parent.parent / "recipes" / "quickstart.yml")
    tokenizer = AutoTokenizer.from_pretrained(str(ASSET_DIR))

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    needles = set()
    sources = [s for s in recipe.sources if isinstance(s, AntiHaystackSource)]
    assert sources
    for source in sources:
        options = dict(
            count=source.count,
            min_tokens=source.length_range[0],
            max_tokens=source.length_range[1],
            depth_range=source.depth_range,
            needles=source.needles,
            tasks=source.tasks,
            zh_fraction=source.zh_fraction,
            seed=source.seed,
        )
        items = list(antihaystack.generate(**options, count_tokens=lambda s: len(s) // 4))
        exact = next(antihaystack.generate(**options, count_tokens=count, indices=[0]))
        assert exact.messages[1].content == items[0].messages[1].content
        for item in items:
            if item.meta["task"] != "needle":
                continue
            found = [m for p in NEEDLE_PATTERNS for m in p.findall(item.messages[1].content)]
            assert found, item.messages[1].content
            needles.update((subject, int(code)) for subject, code in found)
    return needles


def test_eval_needles_never_occur_in_the_quickstart_training_data() -> None:
    training = _quickstart_training_needles()
    assert len(training) >= 28  # 28 of the 48 items are needle tasks, with 1-3 needles each
    for seed in (0, 1):
        for lang in ("en", "zh"):
            eval_needles = {niah.eval_needle(seed, sample, lang) for sample in range(200)}
            assert len(eval_needles) > 150
            assert not eval_needles & training
    # The namespace cannot be selected from a recipe: anti-haystack seeds are integers.
    from longdata.recipe import RecipeError, load_recipe

    recipe = Path(__file__).parent.parent / "recipes" / "quickstart.yml"
    with pytest.raises(RecipeError, match="seed"):
        load_recipe(recipe, [f"sources[2].seed={niah.EVAL_NAMESPACE}"])


# ---------------------------------------------------------------------------------------------
# Scoring


def test_contains_codes() -> None:
    assert contains_codes("The secret code of the amber lantern is 48213.", ["48213"])
    assert contains_codes("48213", ["48213"])
    assert contains_codes("codes: 1234 and 48213", ["1234", "48213"])
    assert not contains_codes("codes: 1234", ["1234", "48213"])
    assert not contains_codes("The code is 148213.", ["48213"])
    assert not contains_codes("The code is 482130.", ["48213"])
    assert not contains_codes("The code is 48,213.", ["48213"])
    assert not contains_codes("", ["48213"])


@pytest.fixture(scope="module")
def small_grid(tokenizer) -> list[niah.NiahPrompt]:
    return niah.build_grid(tokenizer, [256, 512], [0.0, 0.5, 1.0], samples_per_cell=2)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_generate_scoring_counts_right_and_wrong_answers(tokenizer, small_grid) -> None:
    by_prompt = {p.prompt_ids: p for p in small_grid}

    def answer_with(make_text):
        return GenerateScorer(
            None, tokenizer, generate=lambda ids: _ids(tokenizer, make_text(by_prompt[tuple(ids)]))
        )

    def run(make_text):
        return evaluate(small_grid, answer_with(make_text), [256, 512], [0.0, 0.5, 1.0])

    right = run(lambda p: f"The secret code of the {p.subject} is {p.code}.")
    assert right.accuracy == 1.0
    assert right.grid() == [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    assert right.counts() == [[2, 2, 2], [2, 2, 2]]
    assert (
        right.rows[0]["output"] == f"The secret code of the {small_grid[0].subject} is "
        f"{small_grid[0].code}."
    )
    assert run(lambda p: str(p.code)).accuracy == 1.0
    assert run(lambda p: f"It is {p.distractor_codes[0]}.").accuracy == 0.0
    assert run(lambda p: f"It is {p.code}7.").accuracy == 0.0
    # Right only at depth 0 of the 512-token prompts: exactly that cell is 1.
    half = run(lambda p: str(p.code) if (p.length, p.depth) == (512, 0.0) else "no idea")
    assert half.grid() == [[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]
    assert half.accuracy == pytest.approx(2 / 12)
    # Right on needle 0 only, in every cell: the needles are what accuracy averages over.
    first = run(lambda p: str(p.code) if p.sample == 0 else "no idea")
    assert [(n["sample"], n["prompts"], n["accuracy"]) for n in first.by_needle()] == [
        (0, 6, 1.0),
        (1, 6, 0.0),
    ]
    assert first.by_needle()[0]["expected"] == str(small_grid[0].code)
    assert first.accuracy == 0.5 and first.needle_standard_error == pytest.approx(0.5)
    assert right.needle_standard_error == 0.0
    assert first.as_json()["needles"] == first.by_needle()


def test_loglik_scoring_ranks_the_candidates(tokenizer, small_grid) -> None:
    def stub(prefer):
        """Log-probs that favour the candidate holding code `prefer(prompt)`."""

        def score(prompt_ids, continuations):
            item = next(p for p in small_grid if p.prompt_ids == tuple(prompt_ids))
            wanted = str(prefer(item))

            def value(text: str) -> float:
                return 0.0 if wanted in text else -1.0 if str(item.code) in text else -2.0

            # Candidates differ in token count, so only the last token carries the score.
            return [[0.0] * (len(c) - 1) + [value(tokenizer.decode(c))] for c in continuations]

        return LoglikScorer(None, score=score)

    right = evaluate(small_grid, stub(lambda p: p.code), [256, 512], [0.0, 0.5, 1.0])
    assert right.accuracy == 1.0
    assert all(r["rank"] == 1 and r["chosen"] == int(r["expected"]) for r in right.rows)
    assert all(r["answer_logprob"] == 0.0 for r in right.rows)
    wrong = evaluate(small_grid, stub(lambda p: p.distractor_codes[2]), [256, 512], [0.0, 0.5, 1.0])
    assert wrong.accuracy == 0.0
    assert all(r["rank"] == 2 for r in wrong.rows)
    assert [r["chosen"] for r in wrong.rows] == [p.distractor_codes[2] for p in small_grid]
    assert wrong.as_json()["grid"]["mean_answer_logprob"][0][0] < 0
    # A tie is not a win.
    tie = LoglikScorer(None, score=lambda p, conts: [[-1.0] for _ in conts])
    assert tie(small_grid[0])["correct"] is False


def test_continuation_logprobs_equal_one_full_forward(model) -> None:
    """Shared-prefix scoring over the KV cache gives the log-probs of scoring each candidate
    with one plain forward pass over prompt + candidate."""
    rng = np.random.default_rng(0)
    prompt = rng.integers(5, 16_000, 40).tolist()
    shared = rng.integers(5, 16_000, 3).tolist()
    continuations = [
        shared + [11, 12, 13],
        shared + [11, 14],
        shared + [15],
        shared + [16, 17, 18, 19],
    ]
    got = continuation_logprobs(model, prompt, continuations)
    for continuation, values in zip(continuations, got, strict=True):
        tokens = torch.tensor([prompt + continuation])
        with torch.no_grad():
            log_probs = torch.log_softmax(model(input_ids=tokens).logits[0].float(), dim=-1)
        start = len(prompt)
        expected = [float(log_probs[start + i - 1, token]) for i, token in enumerate(continuation)]
        assert values == pytest.approx(expected, abs=1e-4)


def test_greedy_generate_matches_transformers_generate(model) -> None:
    prompt = np.random.default_rng(1).integers(5, 16_000, 30).tolist()
    ours = greedy_generate(model, prompt, max_new_tokens=8)
    with torch.no_grad():
        reference = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=8,
            min_new_tokens=8,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            use_cache=True,
        )[0, len(prompt) :].tolist()
    assert ours == reference
    assert greedy_generate(model, prompt, max_new_tokens=8, stop_ids=[ours[3]]) == ours[:3]


# ---------------------------------------------------------------------------------------------
# The niah command


def test_eval_niah_cli_writes_results_and_heatmap(tmp_path: Path, model_dir: Path) -> None:
    out = tmp_path / "niah"
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "niah",
            "--model",
            str(model_dir),
            "--lengths",
            "256,512",
            "--depths",
            "0,0.5,1",
            "--samples-per-cell",
            "2",
            "--max-new-tokens",
            "4",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "50%" in result.output
    png = (out / "heatmap.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    with (out / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * 3 * 2
    assert {
        "length",
        "prompt_tokens",
        "depth",
        "measured_depth",
        "sample",
        "key",
        "expected",
        "output",
        "correct",
    } <= set(rows[0])
    results = json.loads((out / "results.json").read_text())
    grid = results["grid"]
    assert grid["lengths"] == [256, 512] and grid["depths"] == [0.0, 0.5, 1.0]
    assert np.array(grid["accuracy"]).shape == (2, 3)
    assert grid["prompts"] == [[2, 2, 2], [2, 2, 2]]
    assert len(results["rows"]) == 12
    config = results["config"]
    assert config["mode"] == "generate" and config["seed_namespace"] == "longdata-eval-niah:0"
    correct = [r["correct"] for r in results["rows"]]
    assert results["accuracy"] == pytest.approx(sum(correct) / len(correct))
    # Generate mode scores each sample's question with no needle too (chance: one code in
    # the whole code range).
    control = results["control"]
    assert [r["measured_depth"] for r in control["rows"]] == [None, None]
    assert [r["length"] for r in control["rows"]] == [256, 256]
    assert config["chance_accuracy"] == pytest.approx(1 / 999_000)
    assert "2 control(s)" in result.output


def test_eval_niah_cli_loglik(tmp_path: Path, model_dir: Path) -> None:
    out = tmp_path / "loglik"
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "niah",
            "--model",
            str(model_dir),
            "--lengths",
            "300",
            "--depths",
            "0.5,1",
            "--mode",
            "loglik",
            "--distractors",
            "3",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert np.array(results["grid"]["mean_answer_logprob"]).shape == (1, 2)
    control = results["control"]
    assert len(control["rows"]) == 1 and control["rows"][0]["measured_depth"] is None
    assert control["accuracy"] == float(control["rows"][0]["correct"])
    assert "without the needle" in " ".join(result.output.split())
    for row in results["rows"]:
        assert row["answer_logprob"] < 0 and 1 <= row["rank"] <= 4
        assert row["correct"] == (row["answer_logprob"] > row["best_distractor_logprob"])
    assert (out / "heatmap.png").is_file()


def test_eval_niah_without_a_tokenizer_says_what_to_do(tmp_path: Path, model) -> None:
    bare = tmp_path / "bare"
    model.save_pretrained(bare)
    result = CliRunner().invoke(
        app, ["eval", "niah", "--model", str(bare), "--out", str(tmp_path / "out")]
    )
    assert result.exit_code != 0
    message = " ".join(result.output.replace("│", " ").split())
    assert "has no usable tokenizer" in message and "pass --tokenizer" in message
    fixed = CliRunner().invoke(
        app,
        [
            "eval",
            "niah",
            "--model",
            str(bare),
            "--tokenizer",
            str(ASSET_DIR),
            "--lengths",
            "200",
            "--depths",
            "0.5",
            "--max-new-tokens",
            "2",
            "--out",
            str(tmp_path / "out"),
        ],
    )
    assert fixed.exit_code == 0, fixed.output


# ---------------------------------------------------------------------------------------------
# eval loss


def _loss_build(tmp_path: Path, split: str = "validation") -> tuple[Path, dict]:
    rng = np.random.default_rng(7)
    streams = {
        "le_0064": [make_row([20, 9, 30], rng, 512), make_row([64], rng, 512, sources=[1])],
        "le_0128": [make_row([100, 3, 1], rng, 512), make_row([70, 50], rng, 512)],
    }
    return write_build(tmp_path / "build", streams, 512, 128, split=split), streams


def _alone(model, streams) -> list[tuple[int, str, float, int, int]]:
    """(source, stream, summed loss, targets, length) of every sample, each run alone with no
    packing metadata (plain causal attention over just that sample)."""
    samples = []
    for stream, rows in streams.items():
        for row in rows:
            start = 0
            for length, source in zip(row["seq_lens"], row["source_ids"], strict=True):
                ids = torch.tensor(row["input_ids"][start : start + length].astype(np.int64))
                mask = row["loss_mask"][start : start + length]
                with torch.no_grad():
                    logits = model(input_ids=ids[None]).logits[0].double()
                log_probs = torch.log_softmax(logits, dim=-1)
                targets = [t for t in range(1, int(length)) if mask[t]]
                loss = -sum(float(log_probs[t - 1, ids[t]]) for t in targets)
                samples.append((int(source), stream, loss, len(targets), int(length)))
                start += int(length)
    return samples


def test_eval_loss_equals_samples_run_alone(tmp_path: Path) -> None:
    build, streams = _loss_build(tmp_path)
    model = load_model("tiny-llama", "sdpa_varlen", vocab_size=512, seed=1).eval()
    report = evaluate_loss(model, Manifest.read(build), "validation", batch_size=2)
    alone = _alone(model, streams)
    assert report.rows == 4 and len(report.samples) == len(alone) == 9

    def expected(selected):
        with_targets = [s for s in selected if s[3]]
        return (
            sum(s[2] for s in selected) / sum(s[3] for s in selected),
            sum(s[2] / s[3] for s in with_targets) / len(with_targets),
        )

    def check(stats, selected):
        token_mean, sequence_mean = expected(selected)
        assert stats.samples == len(selected)
        assert stats.target_tokens == sum(s[3] for s in selected)
        assert stats.token_mean == pytest.approx(token_mean, rel=1e-5)
        assert stats.sequence_mean == pytest.approx(sequence_mean, rel=1e-5)

    check(report.overall(), alone)
    by_source = report.by_source()
    assert list(by_source) == ["alpha", "beta"]
    for index, name in enumerate(["alpha", "beta"]):
        check(by_source[name], [s for s in alone if s[0] == index])
    for stream in streams:
        check(report.by_stream()[stream], [s for s in alone if s[1] == stream])
    by_length = report.by_length()
    assert list(by_length) == ["<=1K"]
    assert report.overall().token_mean != pytest.approx(report.overall().sequence_mean)


def test_length_buckets() -> None:
    assert [length_bucket(n) for n in (1, 1024, 1025, 8192, 8193, 16384, 40000)] == [
        "<=1K",
        "<=1K",
        "1K-2K",
        "4K-8K",
        "8K-16K",
        "8K-16K",
        "32K-64K",
    ]


def test_default_split() -> None:
    def manifest(*splits):
        return Manifest.parse(
            Path("."),
            {
                "format": FORMAT,
                "tokenizer": {"name": "t", "vocab_size": 8},
                "sources": [],
                "splits": {s: {"max_seq_len": 8, "streams": []} for s in splits},
            },
        )

    assert default_split(manifest("train", "validation")) == "validation"
    assert default_split(manifest("a/train", "a/validation", "b/train", "b/validation")) == (
        "a/validation"
    )
    assert default_split(manifest("train")) is None


def test_eval_loss_cli(tmp_path: Path) -> None:
    build, _ = _loss_build(tmp_path)
    model_path = tmp_path / "model"
    load_model("tiny-llama", "sdpa_varlen", vocab_size=512, seed=1).save_pretrained(model_path)
    out = tmp_path / "loss"
    command = ["eval", "loss", str(build), "--model", str(model_path), "--out", str(out)]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0, result.output
    assert "alpha" in result.output and "le_0128" in result.output
    report = json.loads((out / "loss.json").read_text())
    assert report["split"] == "validation" and report["rows"] == 4
    assert set(report["by_source"]) == {"alpha", "beta"}
    assert set(report["by_stream"]) == {"le_0064", "le_0128"}
    assert report["all"]["samples"] == 9 and report["all"]["token_mean"] > 0


def test_eval_loss_without_validation_rows(tmp_path: Path) -> None:
    model_path = tmp_path / "model"
    load_model("tiny-llama", "sdpa_varlen", vocab_size=512, seed=1).save_pretrained(model_path)
    train_only, _ = _loss_build(tmp_path / "a", split="train")
    result = CliRunner().invoke(app, ["eval", "loss", str(train_only), "--model", str(model_path)])
    assert result.exit_code == 1
    assert "no validation split" in result.output and "--split" in result.output

    empty = write_build(tmp_path / "b", {"le_0064": []}, 512, 64, split="validation")
    result = CliRunner().invoke(app, ["eval", "loss", str(empty), "--model", str(model_path)])
    assert result.exit_code == 1 and "has no rows" in result.output


# ---------------------------------------------------------------------------------------------
# The trainer saves the build's tokenizer


def _build_with_tokenizer(
    tmp_path: Path, sha256: str | None = None, digest_version: int | None = None
) -> Path:
    rng = np.random.default_rng(0)
    rows = [make_row(rng.integers(2, 20, 3).tolist(), rng, 300) for _ in range(2)]
    build = write_build(tmp_path / "build", {"le_0064": rows}, 16_384, 64)
    return use_quickstart_tokenizer(build, sha256, digest_version)


def test_trainer_saves_the_build_tokenizer(tmp_path: Path, tokenizer) -> None:
    build = _build_with_tokenizer(tmp_path)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", str(build), "--steps", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    saved = AutoTokenizer.from_pretrained(str(out / "final"))
    assert tokenizer_digest(saved) == tokenizer_digest(tokenizer)
    assert saved.chat_template == tokenizer.chat_template
    config = json.loads((out / "final" / "config.json").read_text())
    # The preset's default ids (Llama: eos 2) are replaced by the build tokenizer's.
    assert config["eos_token_id"] == tokenizer.eos_token_id == 16382


def test_a_build_with_a_version_1_digest_still_gets_its_tokenizer_saved(tmp_path: Path) -> None:
    build = _build_with_tokenizer(tmp_path, digest_version=1)
    assert "digest_version" not in json.loads((build / "manifest.json").read_text())["tokenizer"]
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", str(build), "--steps", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "final" / "tokenizer.json").is_file()


def test_digest_v2_covers_the_definition_and_the_bound_template(tokenizer) -> None:
    """Version 2 hashes what decides the tokens and the rendering, not the serialisation."""
    copy = AutoTokenizer.from_pretrained(str(ASSET_DIR))
    assert tokenizer_digest(copy) == tokenizer_digest(tokenizer)
    copy.chat_template = bind_template_kwargs(tokenizer.chat_template, {"think": False})
    assert tokenizer_digest(copy) != tokenizer_digest(tokenizer)
    # Version 1 ignored the template: a build rendered differently passed for the same one.
    assert tokenizer_digest(copy, 1) == tokenizer_digest(tokenizer, 1)
    copy.chat_template = tokenizer.chat_template
    copy.add_special_tokens({"additional_special_tokens": ["<extra>"]})
    assert tokenizer_digest(copy) != tokenizer_digest(tokenizer)


def test_trainer_refuses_a_tokenizer_that_is_not_the_builds(tmp_path: Path, tokenizer) -> None:
    build = _build_with_tokenizer(tmp_path, sha256="0" * 64)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", str(build), "--steps", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output  # a finished run is kept
    assert (out / "final" / "model.safetensors").is_file()
    assert not (out / "final" / "tokenizer.json").exists()
    assert "not the one the build used" in result.output


def test_eval_niah_cli_with_a_real_haystack(tmp_path: Path, model_dir: Path) -> None:
    essay = tmp_path / "essays"
    essay.mkdir()
    (essay / "one.txt").write_text(
        " ".join(
            f"In essay {i} the author argues that founders should talk to users."
            for i in range(400)
        )
    )
    out = tmp_path / "haystack"
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "niah",
            "--model",
            str(model_dir),
            "--lengths",
            "256",
            "--depths",
            "0.5",
            "--max-new-tokens",
            "2",
            "--haystack",
            str(essay),
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["haystack"] == [str(essay)]
    missing = CliRunner().invoke(
        app,
        [
            "eval",
            "niah",
            "--model",
            str(model_dir),
            "--haystack",
            str(tmp_path / "nope.txt"),
            "--out",
            str(out),
        ],
    )
    assert missing.exit_code == 2 and "such file" in missing.output, missing.output
    chinese = CliRunner().invoke(
        app,
        [
            "eval",
            "niah",
            "--model",
            str(model_dir),
            "--haystack",
            str(essay),
            "--lang",
            "zh",
            "--out",
            str(out),
        ],
    )
    assert chinese.exit_code == 2 and "no zh text" in chinese.output, chinese.output


def test_the_saved_tokenizer_renders_with_the_recipes_template_kwargs(tmp_path: Path) -> None:
    """A checkpoint renders prompts as its build did: eval niah and any other tool loading it get
    the recipe's chat_template_kwargs without being told. The template is the manifest's bound
    one: the recipe's template path (relative to wherever the build ran) is never re-read."""
    from longdata.trainer.tokenizer import save_build_tokenizer

    build = _build_with_tokenizer(tmp_path)
    manifest = json.loads((build / "manifest.json").read_text())
    qwen3 = Path(__file__).parent / "templates" / "qwen3.jinja"
    manifest.setdefault("recipe", {})["tokenizer"] = {
        "name": "builtin:quickstart",
        "chat_template": "templates/qwen3.jinja",  # no such file from here
        "chat_template_kwargs": {"enable_thinking": False},
    }
    # The digest (version 2) covers the template the build rendered with.
    built_with = AutoTokenizer.from_pretrained(str(ASSET_DIR))
    built_with.chat_template = bind_template_kwargs(qwen3.read_text(), {"enable_thinking": False})
    manifest["tokenizer"]["chat_template"] = built_with.chat_template
    manifest["tokenizer"]["sha256"] = tokenizer_digest(built_with)
    (build / "manifest.json").write_text(json.dumps(manifest))
    assert save_build_tokenizer(build, tmp_path / "saved") is None
    saved = AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    prompt = niah.generation_prompt(saved, "Where?")
    assert (
        prompt
        == "<|im_start|>user\nWhere?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
