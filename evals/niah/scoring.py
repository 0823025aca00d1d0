"""Score needle-in-a-haystack prompts: `generate` or `loglik`, one row per prompt.

- `generate`: greedy decoding of at most `max_new_tokens` tokens, stopping at an end-of-turn /
  end-of-text token. Correct iff every expected code appears in the decoded text (special tokens
  skipped) as a whole number: not preceded or followed by another digit.
- `loglik`: the log-probability of the reference answer (the needle sentence, in the form the
  training target renders it: the template's text around it and the end-of-turn token
  included) given the prompt, against the same sentence with each distractor code. Correct iff
  the reference scores strictly higher than every distractor.

A model can produce or prefer one code over another without reading the haystack, so the same
questions are also scored on control prompts with no needle at all
(`NiahReport.control_rows`): grid accuracy near the control's is no evidence of retrieval.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from longdata.evals.niah.decoding import continuation_logprobs, greedy_generate
from longdata.evals.niah.prompts import NiahPrompt
from longdata.evals.niah.report import NiahReport

MODES = ("generate", "loglik")


def contains_codes(text: str, codes: Iterable[str]) -> bool:
    """True iff every code occurs in `text` as a whole number (no digit right before or after).

    "The code is 48213." contains 48213; "148213" and "48213 7" contain 48213 only in the
    second case. Digit groupings such as "48,213" do not count.
    """
    return all(re.search(rf"(?<!\d){re.escape(code)}(?!\d)", text) for code in codes)


def stop_token_ids(tokenizer: Any, model: torch.nn.Module | None = None) -> list[int]:
    """The tokens that end an answer: the tokenizer's eos and the model's generation eos."""
    ids = set()
    for value in (
        tokenizer.eos_token_id,
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
    ):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return sorted(ids)


class GenerateScorer:
    """`--mode generate`: greedy answer, correct iff it contains the expected code(s)."""

    mode = "generate"
    columns = ("output", "new_tokens")

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        max_new_tokens: int = 32,
        generate: Callable[[Sequence[int]], list[int]] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        stops = stop_token_ids(tokenizer, model)
        self._generate = generate or (
            lambda ids: greedy_generate(model, ids, max_new_tokens, stops)
        )

    def __call__(self, item: NiahPrompt) -> dict[str, Any]:
        new_tokens = self._generate(item.prompt_ids)
        output = self.tokenizer.decode(new_tokens, skip_special_tokens=True)
        return {
            "output": output,
            "new_tokens": len(new_tokens),
            "correct": contains_codes(output, item.expected),
        }


class LoglikScorer:
    """`--mode loglik`: does the reference answer outscore the same answer with other codes?"""

    mode = "loglik"
    columns = (
        "answer_logprob",
        "answer_tokens",
        "best_distractor_logprob",
        "rank",
        "chosen",
    )

    def __init__(
        self,
        model: torch.nn.Module | None,
        score: Callable[[Sequence[int], Sequence[Sequence[int]]], list[list[float]]] | None = None,
    ) -> None:
        # The candidates come tokenized with the prompt (NiahPrompt.answer_ids), as training
        # tokenized them; no tokenizer is needed here.
        self._score = score or (lambda prompt, conts: continuation_logprobs(model, prompt, conts))

    def __call__(self, item: NiahPrompt) -> dict[str, Any]:
        if not item.distractors:
            raise ValueError("loglik scoring needs at least one distractor answer")
        codes = [item.code, *item.distractor_codes]
        token_ids = [list(item.answer_ids), *(list(ids) for ids in item.distractor_ids)]
        totals = [sum(values) for values in self._score(item.prompt_ids, token_ids)]
        answer, others = totals[0], totals[1:]
        # Ties go against the reference, as `correct` does.
        best = max(range(len(totals)), key=lambda i: (totals[i], i != 0))
        return {
            "answer_logprob": answer,
            "answer_tokens": len(token_ids[0]),
            "best_distractor_logprob": max(others),
            "rank": 1 + sum(other >= answer for other in others),
            "chosen": codes[best],
            "correct": answer > max(others),
        }


def evaluate(
    items: Iterable[NiahPrompt],
    scorer: GenerateScorer | LoglikScorer,
    lengths: Sequence[int],
    depths: Sequence[float],
    config: dict[str, Any] | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> NiahReport:
    """Score every item; `on_row` sees each finished row (for progress)."""
    rows = []
    for item in items:
        started = time.perf_counter()
        scored = scorer(item)
        row = {
            "length": item.length,
            "prompt_tokens": len(item.prompt_ids),
            "depth": item.depth,
            "measured_depth": item.measured_depth,
            "sample": item.sample,
            "key": item.key,
            "subject": item.subject,
            "expected": " ".join(item.expected),
            **scored,
            "seconds": round(time.perf_counter() - started, 3),
        }
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return NiahReport(dict(config or {}), list(lengths), list(depths), rows, scorer.mode)
