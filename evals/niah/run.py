"""One NIAH run: prompts for a grid, scored by a model, with no-needle controls and timings.

`run_niah` scores a model already in memory (`benchmarks/learn_niah.py` evaluates the same
model before and after training with it); `run_niah_checkpoint` loads a checkpoint and its
tokenizer first (`longdata eval niah`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from longdata.evals.models import EvalInputError, load_eval_model
from longdata.evals.niah.prompts import CODE_RANGE, EVAL_NAMESPACE, build_controls, build_grid
from longdata.evals.niah.report import NiahReport
from longdata.evals.niah.scoring import MODES, GenerateScorer, LoglikScorer, evaluate
from longdata.sources.antihaystack import Haystack
from longdata.sources.synthetic import LANGS, Lang

# (description, total) -> a function to call once per finished item.
Track = Callable[[str, int], Callable[[], None]]


def no_progress(description: str, total: int) -> Callable[[], None]:
    return lambda: None


@dataclass(frozen=True)
class NiahSpec:
    """What to measure: the grid, the scoring mode and the prompts' seed and language."""

    lengths: tuple[int, ...]
    depths: tuple[float, ...]
    samples_per_cell: int = 1
    mode: str = "generate"
    max_new_tokens: int = 32
    distractors: int = 4
    lang: Lang = "en"
    seed: int = 0
    haystack: tuple[str, ...] = ()  # real filler text (files, directories, JSONL/Parquet)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise EvalInputError("--mode", f"choose from {', '.join(MODES)}, not {self.mode!r}")
        if self.lang not in LANGS:
            raise EvalInputError("--lang", f"choose from {', '.join(LANGS)}, not {self.lang!r}")
        counts = {
            "--samples-per-cell": self.samples_per_cell,
            "--max-new-tokens": self.max_new_tokens,
            "--distractors": self.distractors,
        }
        for option, value in counts.items():
            if value < 1:
                raise EvalInputError(option, f"must be >= 1, got {value}")
        if not self.lengths or not self.depths:
            raise EvalInputError("--lengths", "the grid needs at least one length and one depth")

    @property
    def chance_accuracy(self) -> float:
        """Accuracy of a model that ignores the prompt: guessing one code of the range in
        generate mode, picking one of 1 + distractors candidates in loglik mode."""
        if self.mode == "loglik":
            return 1 / (1 + self.distractors)
        return 1 / (CODE_RANGE[1] - CODE_RANGE[0])

    def describe(self) -> dict[str, Any]:
        generate = self.mode == "generate"
        return {
            "mode": self.mode,
            "lengths": list(self.lengths),
            "depths": list(self.depths),
            "samples_per_cell": self.samples_per_cell,
            "seed": self.seed,
            "seed_namespace": f"{EVAL_NAMESPACE}:{self.seed}",
            "lang": self.lang,
            "haystack": list(self.haystack) or None,
            "max_new_tokens": self.max_new_tokens if generate else None,
            "distractors": None if generate else self.distractors,
            "chance_accuracy": self.chance_accuracy,
            "context_length": (
                "prompt tokens: chat template + haystack + question + assistant header"
            ),
            "depth": "needle start / haystack characters; requested and measured per row",
            "correct": (
                "every expected code appears in the greedy output as a whole number"
                if generate
                else "log p(reference answer) > log p(each distractor answer)"
            ),
            "control": "each sample's question over filler with no needle, at the shortest length",
        }


def load_haystack(spec: NiahSpec) -> Haystack | None:
    """The spec's real filler text, read and split into sentences; None for generated prose."""
    if not spec.haystack:
        return None
    try:
        haystack = Haystack.from_paths(spec.haystack)
    except (FileNotFoundError, ValueError) as error:
        raise EvalInputError("--haystack", str(error)) from None
    if spec.lang not in haystack.languages:
        raise EvalInputError("--haystack", f"it has no {spec.lang} text")
    return haystack


def run_niah(
    model: Any,
    tokenizer: Any,
    spec: NiahSpec,
    *,
    haystack: Haystack | None = None,
    describe: Mapping[str, Any] | None = None,
    track: Track = no_progress,
) -> NiahReport:
    """Build the grid's prompts and controls, score them with `model`, return the report.

    `haystack` is the spec's filler already loaded (`load_haystack`), read here if not given.
    `describe` goes into `report.config` (model name, device, ...) next to the spec.
    """
    started = time.perf_counter()
    if haystack is None:
        haystack = load_haystack(spec)
    total = len(spec.lengths) * len(spec.depths) * spec.samples_per_cell
    advance = track("building prompts", total)
    try:
        prompts = build_grid(
            tokenizer,
            spec.lengths,
            spec.depths,
            spec.samples_per_cell,
            seed=spec.seed,
            lang=spec.lang,
            distractors=spec.distractors,
            on_prompt=lambda _: advance(),
            haystack=haystack,
        )
        controls = build_controls(
            tokenizer,
            min(spec.lengths),
            spec.samples_per_cell,
            seed=spec.seed,
            lang=spec.lang,
            distractors=spec.distractors,
            haystack=haystack,
        )
    except ValueError as error:
        raise EvalInputError("--lengths", str(error)) from None
    vocab = model.get_input_embeddings().num_embeddings
    if max(max(p.prompt_ids) for p in prompts) >= vocab:
        raise EvalInputError(
            "--tokenizer",
            f"the tokenizer produces ids beyond the model's {vocab}-token embedding: wrong "
            "tokenizer for this model",
        )
    built = time.perf_counter()

    if spec.mode == "generate":
        scorer = GenerateScorer(model, tokenizer, max_new_tokens=spec.max_new_tokens)
    else:
        scorer = LoglikScorer(model)
    advance = track(f"scoring ({spec.mode})", len(prompts) + len(controls))
    report = evaluate(
        prompts,
        scorer,
        spec.lengths,
        spec.depths,
        {**(describe or {}), **spec.describe()},
        on_row=lambda _: advance(),
    )
    report.control_rows = evaluate(
        controls, scorer, [min(spec.lengths)], [0.5], on_row=lambda _: advance()
    ).rows
    finished = time.perf_counter()
    report.config["seconds"] = {
        "build_prompts": round(built - started, 2),
        "score": round(finished - built, 2),
    }
    return report


def run_niah_checkpoint(
    model: str,
    spec: NiahSpec,
    *,
    tokenizer: str | None = None,
    attention: str = "auto",
    dtype: str = "auto",
    device: str = "auto",
    track: Track = no_progress,
    warn: Callable[[str], None] = lambda message: None,
) -> NiahReport:
    """`run_niah` on a checkpoint (a local directory or a hub id) and its tokenizer.

    The tokenizer is the model's own unless `tokenizer` names another (a directory, a hub id or
    the build directory the model was trained on). The model is loaded before any prompt is
    built, so a wrong `model` fails at once.
    """
    from longdata.trainer.tokenizer import TokenizerUnavailable, load_model_tokenizer

    started = time.perf_counter()
    haystack = load_haystack(spec)  # before the model: a bad path fails at once
    try:
        tok = load_model_tokenizer(model, tokenizer)
    except TokenizerUnavailable as error:
        raise EvalInputError("--tokenizer", str(error)) from None
    lm, device_name, dtype_name = load_eval_model(model, attention, device, dtype)
    context = getattr(lm.config, "max_position_embeddings", None)
    if context and max(spec.lengths) > context:
        warn(
            f"lengths up to {max(spec.lengths):,} tokens exceed the model's "
            f"max_position_embeddings ({context:,})"
        )
    loaded = time.perf_counter()
    describe = {
        "model": model,
        "tokenizer": tokenizer or model,
        "attention": attention,
        "dtype": dtype_name,
        "device": device_name,
    }
    report = run_niah(lm, tok, spec, haystack=haystack, describe=describe, track=track)
    seconds = report.config["seconds"]
    seconds["load_model"] = round(loaded - started, 2)
    seconds["total"] = round(time.perf_counter() - started, 2)  # before writing the outputs
    return report
