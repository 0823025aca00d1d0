"""One RULER-style run: per task and length, seeded prompts scored by greedy generation.

Held-out seeds: every prompt's random choices come from ``random.Random`` keyed by strings under
``EVAL_NAMESPACE`` (``"longdata-eval-ruler:<seed>:<task>:<lang>:<sample>"``). Recipes key theirs
as ``"<seed>:<index>"`` with an integer seed (the recipe schema accepts only integers), so no
recipe can reproduce an eval prompt. Sample ``s`` of a task is the same task (planted
sentences, filler stream) at every length, so the samples are the independent draws behind a
task's standard error. Each sample's control is its prompt with the signal sentences removed,
at the shortest length: no answer is recoverable, so it scores about a blind guess
(`ruler.chance_accuracy`, at most qa's 1/121).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from longdata.evals.models import EvalInputError, load_eval_model
from longdata.evals.niah.decoding import greedy_generate
from longdata.evals.niah.prompts import calibrate, encode, fit_prompt, generation_prompt
from longdata.evals.niah.report import mean, standard_error
from longdata.evals.niah.run import Track, load_haystack, no_progress
from longdata.evals.niah.scoring import stop_token_ids
from longdata.sources import antihaystack, ruler
from longdata.sources.antihaystack import Haystack, SyntheticFiller
from longdata.sources.synthetic import LANGS, Lang

EVAL_NAMESPACE = "longdata-eval-ruler"


@dataclass(frozen=True)
class RulerSpec:
    lengths: tuple[int, ...]
    tasks: tuple[str, ...] = ruler.TASKS
    samples: int = 4
    # Answers are sentences; the longest (cwe's, in Chinese) is ~70 tokens with the bundled
    # tokenizer. Decoding stops at the end of turn, so a short answer costs no more.
    max_new_tokens: int = 80
    lang: Lang = "en"
    seed: int = 0
    haystack: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.lengths:
            raise EvalInputError("--lengths", "give at least one length")
        unknown = set(self.tasks) - set(ruler.TASKS)
        if not self.tasks or unknown:
            raise EvalInputError("--tasks", f"choose from {', '.join(ruler.TASKS)}")
        if self.lang not in LANGS:
            raise EvalInputError("--lang", f"choose from {', '.join(LANGS)}, not {self.lang!r}")
        for option, value in {
            "--samples": self.samples,
            "--max-new-tokens": self.max_new_tokens,
        }.items():
            if value < 1:
                raise EvalInputError(option, f"must be >= 1, got {value}")

    def describe(self) -> dict[str, Any]:
        return {
            "lengths": list(self.lengths),
            "tasks": list(self.tasks),
            "samples": self.samples,
            "max_new_tokens": self.max_new_tokens,
            "lang": self.lang,
            "seed": self.seed,
            "seed_namespace": f"{EVAL_NAMESPACE}:{self.seed}",
            "haystack": list(self.haystack) or None,
            "correct": "the greedy output names every expected item and no distractor",
            "recall": "the share of the expected items it names (RULER's string_match_all)",
            "control": "each sample's prompt without its signal sentences, at the shortest length",
        }


@dataclass(frozen=True)
class RulerPrompt:
    task: str
    length: int
    sample: int
    key: str
    control: bool
    prompt_ids: tuple[int, ...]
    expected: tuple[str, ...]
    distractors: tuple[str, ...]


def sample_key(seed: int, task: str, lang: Lang, sample: int) -> str:
    return f"{EVAL_NAMESPACE}:{seed}:{task}:{lang}:{sample}"


def build_prompt(
    tokenizer: Any,
    task: str,
    *,
    length: int,
    sample: int,
    spec: RulerSpec,
    chars_per_token: float,
    control: bool = False,
    haystack: Haystack | None = None,
) -> RulerPrompt:
    """Sample ``sample`` of ``task`` in a chat-templated prompt of at most ``length`` tokens."""
    key = sample_key(spec.seed, task, spec.lang, sample)
    planted = ruler.make_task(random.Random(key), task, spec.lang, haystack=haystack)
    rng = random.Random(f"{key}:filler")
    filler = haystack.filler(rng, spec.lang) if haystack else SyntheticFiller(rng, spec.lang)

    def templated_ids(rendered: antihaystack.Rendered) -> list[int]:
        return encode(tokenizer, generation_prompt(tokenizer, rendered.prompt))

    rendered = fit_prompt(
        planted.control() if control else planted, filler, length, chars_per_token, templated_ids
    )
    return RulerPrompt(
        task,
        length,
        sample,
        key,
        control,
        tuple(templated_ids(rendered)),
        planted.expected,
        planted.distractors,
    )


def build_prompts(
    tokenizer: Any, spec: RulerSpec, haystack: Haystack | None = None
) -> list[RulerPrompt]:
    """Every (task, length, sample) prompt, then each (task, sample)'s control."""
    chars_per_token = calibrate(tokenizer, spec.seed, spec.lang, haystack)
    common = dict(spec=spec, chars_per_token=chars_per_token, haystack=haystack)
    prompts = [
        build_prompt(tokenizer, task, length=length, sample=sample, **common)
        for task in spec.tasks
        for length in spec.lengths
        for sample in range(spec.samples)
    ]
    controls = [
        build_prompt(tokenizer, task, length=min(spec.lengths), sample=s, control=True, **common)
        for task in spec.tasks
        for s in range(spec.samples)
    ]
    return prompts + controls


def _mean_of(rows: Sequence[dict[str, Any]], field: str, **equal: Any) -> float | None:
    """The mean of ``field`` over the rows whose other fields have the values in ``equal``."""
    return mean([r[field] for r in rows if all(r[k] == v for k, v in equal.items())])


def summarise(rows: Sequence[dict[str, Any]], spec: RulerSpec) -> dict[str, dict[str, Any]]:
    """Per task: accuracy, its standard error over samples, accuracy per length, control; and
    the same for recall (partial credit, RULER's own metric)."""
    tasks = {}
    for task in spec.tasks:
        scored = [r for r in rows if r["task"] == task and not r["control"]]
        controls = [r for r in rows if r["task"] == task and r["control"]]
        per_sample = {
            field: [_mean_of(scored, field, sample=s) for s in range(spec.samples)]
            for field in ("correct", "recall")
        }
        tasks[task] = {
            "accuracy": _mean_of(scored, "correct"),
            "standard_error": standard_error(per_sample["correct"]),
            "by_length": {str(n): _mean_of(scored, "correct", length=n) for n in spec.lengths},
            "control_accuracy": _mean_of(controls, "correct"),
            "chance_accuracy": ruler.chance_accuracy(task, spec.lang),
            "recall": _mean_of(scored, "recall"),
            "recall_standard_error": standard_error(per_sample["recall"]),
            "recall_by_length": {
                str(n): _mean_of(scored, "recall", length=n) for n in spec.lengths
            },
            "control_recall": _mean_of(controls, "recall"),
        }
    return tasks


def run_ruler(
    model: Any,
    tokenizer: Any,
    spec: RulerSpec,
    *,
    haystack: Haystack | None = None,
    describe: dict[str, Any] | None = None,
    track: Track = no_progress,
    generate: Callable[[Sequence[int]], list[int]] | None = None,
) -> dict[str, Any]:
    """Build the prompts, answer each greedily, score it: the results.json object."""
    started = time.perf_counter()
    try:
        prompts = build_prompts(tokenizer, spec, haystack)
    except ValueError as error:
        raise EvalInputError("--lengths", str(error)) from None
    built = time.perf_counter()
    if generate is None:
        stops = stop_token_ids(tokenizer, model)
        generate = lambda ids: greedy_generate(model, ids, spec.max_new_tokens, stops)  # noqa: E731
    advance = track("scoring", len(prompts))
    rows = []
    for prompt in prompts:
        output = tokenizer.decode(generate(prompt.prompt_ids), skip_special_tokens=True)
        rows.append(
            {
                "task": prompt.task,
                "length": prompt.length,
                "prompt_tokens": len(prompt.prompt_ids),
                "sample": prompt.sample,
                "key": prompt.key,
                "control": prompt.control,
                "expected": ", ".join(prompt.expected),
                "output": output,
                "correct": ruler.score(prompt.expected, prompt.distractors, output),
                "recall": ruler.recall(prompt.expected, output),
            }
        )
        advance()
    config = {**(describe or {}), **spec.describe()}
    config["seconds"] = {
        "build_prompts": round(built - started, 2),
        "score": round(time.perf_counter() - built, 2),
    }
    return {"config": config, "tasks": summarise(rows, spec), "rows": rows}


def run_ruler_checkpoint(
    model: str,
    spec: RulerSpec,
    *,
    tokenizer: str | None = None,
    attention: str = "auto",
    dtype: str = "auto",
    device: str = "auto",
    track: Track = no_progress,
) -> dict[str, Any]:
    """`run_ruler` on a checkpoint (a local directory or a hub id) and its tokenizer."""
    from longdata.trainer.tokenizer import TokenizerUnavailable, load_model_tokenizer

    haystack = load_haystack(spec)  # before the model: a bad path fails at once
    try:
        tok = load_model_tokenizer(model, tokenizer)
    except TokenizerUnavailable as error:
        raise EvalInputError("--tokenizer", str(error)) from None
    lm, device_name, dtype_name = load_eval_model(model, attention, device, dtype)
    describe = {
        "model": model,
        "tokenizer": tokenizer or model,
        "device": device_name,
        "dtype": dtype_name,
        "attention": attention,
    }
    return run_ruler(lm, tok, spec, haystack=haystack, describe=describe, track=track)
