"""Score needle-in-a-haystack prompts with a causal LM and report a length x depth grid.

The prompts come from `longdata.niah.build_grid` (this module only needs their attributes, see
`NiahItem`). Two ways to score one prompt:

- `generate`: greedy decoding of at most `max_new_tokens` tokens, stopping at an end-of-turn /
  end-of-text token. Correct iff every expected code appears in the decoded text (special tokens
  skipped) as a whole number: not preceded or followed by another digit.
- `loglik`: the log-probability of the reference answer (the needle sentence, in the form the
  training target renders it: the template's text around it and the end-of-turn token
  included) given the prompt, against the same sentence with each distractor code. Correct iff the reference scores strictly
  higher than every distractor. A model can prefer one code over another without reading the
  haystack, so the same question is also scored on control prompts with no needle at all
  (`NiahReport.control_rows`): grid accuracy near the control's is no evidence of retrieval.

Both run one prompt at a time, unpadded. The prompt is prefilled once with packing metadata for
a single sample, so the attention backend chosen with `load_model(attention=...)` runs it
(flash-attn's varlen kernel on a GPU, per-segment SDPA on a CPU); the few tokens after it reuse
the KV cache.
"""

from __future__ import annotations

import csv
import json
import math
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

MODES = ("generate", "loglik")


class NiahItem(Protocol):
    """What scoring needs from a prompt (`longdata.niah.NiahPrompt` has it)."""

    length: int
    depth: float
    sample: int
    key: str
    prompt_ids: tuple[int, ...]
    measured_depth: float
    subject: str
    code: int
    answer: str
    distractor_codes: tuple[int, ...]
    distractors: tuple[str, ...]
    answer_ids: tuple[int, ...]  # the answer as the training target renders it
    distractor_ids: tuple[tuple[int, ...], ...]

    @property
    def expected(self) -> tuple[str, ...]: ...


# ---------------------------------------------------------------------------------------------
# Running the model


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def prefill_inputs(prompt_ids: Sequence[int], device: torch.device) -> dict[str, Any]:
    """`model.forward` inputs for one unpadded prompt, with the packing metadata of a single
    sample (what `trainer.collate` gives a one-sample row), so every attention backend runs."""
    length = len(prompt_ids)
    return {
        "input_ids": torch.tensor([list(prompt_ids)], dtype=torch.int64, device=device),
        "position_ids": torch.arange(length, device=device)[None],
        "cu_seqlens": torch.tensor([0, length], dtype=torch.int32, device=device),
        "max_seqlen": length,
        "document_ids": torch.zeros(1, length, dtype=torch.int32, device=device),
    }


def _new_cache() -> Any:
    from transformers import DynamicCache

    return DynamicCache()


@torch.inference_mode()
def greedy_generate(
    model: torch.nn.Module,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    stop_ids: Iterable[int] = (),
) -> list[int]:
    """Greedy decoding with a KV cache: the new tokens, without the stop token that ended it.

    The prompt is one forward pass with packing metadata; each new token is one forward of a
    single token over the cache. Only the last position's logits are computed.
    """
    stop = set(stop_ids)
    cache = _new_cache()
    device = _device(model)
    inputs = prefill_inputs(prompt_ids, device)
    logits = model(**inputs, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    generated: list[int] = []
    while len(generated) < max_new_tokens:
        token = int(logits[0, -1].argmax())
        if token in stop:
            break
        generated.append(token)
        if len(generated) == max_new_tokens:
            break
        step = torch.tensor([[token]], dtype=torch.int64, device=device)
        logits = model(input_ids=step, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    return generated


def _common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    shortest = min(len(s) for s in sequences)
    for i in range(shortest):
        if any(s[i] != sequences[0][i] for s in sequences[1:]):
            return i
    return shortest


@torch.inference_mode()
def continuation_logprobs(
    model: torch.nn.Module, prompt_ids: Sequence[int], continuations: Sequence[Sequence[int]]
) -> list[list[float]]:
    """log P(token | prompt, earlier tokens of the continuation) for every continuation token.

    The prompt and the continuations' shared first tokens are run once; then each
    continuation's remaining tokens run as one forward over that KV cache, which is cropped
    back before the next.
    """
    if not continuations or any(len(c) == 0 for c in continuations):
        raise ValueError("every continuation needs at least one token")
    device = _device(model)
    shared = _common_prefix_length(continuations)
    prefix = [*prompt_ids, *continuations[0][:shared]]
    cache = _new_cache()
    logits = model(
        **prefill_inputs(prefix, device), past_key_values=cache, use_cache=True,
        logits_to_keep=shared + 1,
    ).logits[0]
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    shared_values = [float(log_probs[i, continuations[0][i]]) for i in range(shared)]
    after_prefix = log_probs[shared]
    results = []
    for continuation in continuations:
        rest = list(continuation[shared:])
        values = list(shared_values)
        if rest:
            values.append(float(after_prefix[rest[0]]))
        if len(rest) > 1:
            step = torch.tensor([rest[:-1]], dtype=torch.int64, device=device)
            more = model(input_ids=step, past_key_values=cache, use_cache=True).logits[0]
            more = torch.log_softmax(more.float(), dim=-1)
            values.extend(float(more[i, rest[i + 1]]) for i in range(len(rest) - 1))
            cache.crop(len(prefix))
        results.append(values)
    return results


# ---------------------------------------------------------------------------------------------
# Scoring


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

    def __call__(self, item: NiahItem) -> dict[str, Any]:
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
        # The candidates come tokenized with the prompt (NiahItem.answer_ids), as training
        # tokenized them; no tokenizer is needed here.
        self._score = score or (lambda prompt, conts: continuation_logprobs(model, prompt, conts))

    def __call__(self, item: NiahItem) -> dict[str, Any]:
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


# ---------------------------------------------------------------------------------------------
# Results


ITEM_COLUMNS = (
    "length",
    "prompt_tokens",
    "depth",
    "measured_depth",
    "sample",
    "key",
    "subject",
    "expected",
)


@dataclass
class NiahReport:
    """Per-prompt rows and the grid they make; `config` describes the run."""

    config: dict[str, Any]
    lengths: list[int]
    depths: list[float]
    rows: list[dict[str, Any]]
    mode: str
    control_rows: list[dict[str, Any]] | None = None  # loglik: the same questions, no needle

    def _cells(self, key: str) -> list[list[list[float]]]:
        cells: list[list[list[float]]] = [[[] for _ in self.depths] for _ in self.lengths]
        for row in self.rows:
            i, j = self.lengths.index(row["length"]), self.depths.index(row["depth"])
            cells[i][j].append(float(row[key]))
        return cells

    def grid(self, key: str = "correct") -> list[list[float | None]]:
        """Mean of `key` per cell, [length][depth]; None for an empty cell."""
        return [
            [sum(c) / len(c) if c else None for c in row] for row in self._cells(key)
        ]

    def counts(self) -> list[list[int]]:
        return [[len(c) for c in row] for row in self._cells("correct")]

    @property
    def accuracy(self) -> float | None:
        return _mean([r["correct"] for r in self.rows])

    @property
    def control_accuracy(self) -> float | None:
        """How often the reference answer wins with no needle in the prompt at all."""
        return _mean([r["correct"] for r in self.control_rows or []])

    def as_json(self) -> dict[str, Any]:
        grid: dict[str, Any] = {
            "lengths": self.lengths,
            "depths": self.depths,
            "accuracy": self.grid("correct"),
            "prompts": self.counts(),
        }
        if self.mode == "loglik":
            grid["mean_answer_logprob"] = self.grid("answer_logprob")
        result = {
            "config": self.config,
            "accuracy": self.accuracy,
            "grid": grid,
            "rows": self.rows,
        }
        if self.control_rows is not None:
            result["control"] = {
                "what": "each sample's question and candidates over filler with no needle",
                "accuracy": self.control_accuracy,
                "mean_answer_logprob": _mean([r["answer_logprob"] for r in self.control_rows]),
                "rows": self.control_rows,
            }
        return result


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def evaluate(
    items: Iterable[NiahItem],
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


def format_length(tokens: int) -> str:
    """4096 -> "4K", 131072 -> "128K", 1536 -> "1.5K", 500 -> "500" (K = 1024 tokens)."""
    if tokens >= 1024 * 1024 and tokens % (1024 * 1024) == 0:
        return f"{tokens // (1024 * 1024)}M"
    if tokens >= 1024 and (tokens * 10) % 1024 == 0:
        return f"{tokens / 1024:g}K"
    return str(tokens)


def format_depth(depth: float) -> str:
    return f"{depth * 100:g}%"


def write_csv(report: NiahReport, path: Path) -> None:
    columns = [*ITEM_COLUMNS]
    for row in report.rows:
        columns.extend(key for key in row if key not in columns)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(report.rows)


def plot_heatmap(report: NiahReport, path: Path, title: str) -> None:
    """Accuracy per cell: context length across, needle depth down (0% at the top)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    accuracy = report.grid("correct")
    values = np.array(
        [[np.nan if v is None else v for v in row] for row in accuracy], dtype=float
    ).T  # [depth][length]
    width = max(5.0, 1.1 * len(report.lengths) + 2.5)
    height = max(3.5, 0.55 * len(report.depths) + 2.0)
    figure, axes = plt.subplots(figsize=(width, height), dpi=120)
    image = axes.imshow(values, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    counts = np.array(report.counts()).T
    for d in range(values.shape[0]):
        for n in range(values.shape[1]):
            if counts[d, n] == 0:
                continue
            value = values[d, n]
            axes.text(
                n, d, f"{value:.2f}", ha="center", va="center", fontsize=9,
                color="black" if 0.25 < value < 0.85 else "white",
            )
    axes.set_xticks(range(len(report.lengths)), [format_length(x) for x in report.lengths])
    axes.set_yticks(range(len(report.depths)), [format_depth(d) for d in report.depths])
    axes.set_xlabel("context length (prompt tokens)")
    axes.set_ylabel("needle depth (% of haystack)")
    axes.set_title(title, fontsize=10)
    colorbar = figure.colorbar(image, ax=axes, fraction=0.05, pad=0.03)
    colorbar.set_label("accuracy")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def heatmap_title(report: NiahReport) -> str:
    model = str(report.config.get("model", "model"))
    name = "/".join(Path(model).resolve().parts[-2:]) if Path(model).exists() else model
    per_cell = max((n for row in report.counts() for n in row), default=0)
    accuracy = report.accuracy
    overall = "n/a" if accuracy is None else f"{accuracy:.0%}"
    notes = []
    if report.config.get("chance_accuracy"):
        notes.append(f"chance {report.config['chance_accuracy']:.0%}")
    if report.control_accuracy is not None:
        notes.append(f"without needle {report.control_accuracy:.0%}")
    note = f"\n{', '.join(notes)}" if notes else ""
    return (
        f"Needle in a haystack: {name}\n"
        f"{report.mode}, {per_cell} prompt(s) per cell, overall accuracy {overall}{note}"
    )


def write_outputs(report: NiahReport, out_dir: str | Path) -> dict[str, Path]:
    """results.csv, results.json and heatmap.png in `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "csv": out_dir / "results.csv",
        "json": out_dir / "results.json",
        "heatmap": out_dir / "heatmap.png",
    }
    write_csv(report, paths["csv"])
    paths["json"].write_text(
        json.dumps(report.as_json(), indent=2, ensure_ascii=False, default=_json_default) + "\n",
        encoding="utf-8",
    )
    plot_heatmap(report, paths["heatmap"], heatmap_title(report))
    return paths


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def grid_table(report: NiahReport) -> Any:
    """A rich table: one row per depth, one column per length, accuracy (and n) per cell."""
    from rich.table import Table

    accuracy = report.grid("correct")
    counts = report.counts()
    per_cell = max((n for row in counts for n in row), default=0)
    title = f"needle-in-a-haystack accuracy ({report.mode}, {per_cell} per cell)"
    table = Table(title=title, title_justify="left")
    table.add_column("depth", justify="right")
    for length in report.lengths:
        table.add_column(format_length(length), justify="right")
    for j, depth in enumerate(report.depths):
        cells = []
        for i in range(len(report.lengths)):
            value = accuracy[i][j]
            cells.append("-" if value is None else f"{value:.2f} ({counts[i][j]})")
        table.add_row(format_depth(depth), *cells)
    if report.mode == "loglik":
        logprob = report.grid("answer_logprob")
        means = [
            sum(v for v in column if v is not None) / max(1, sum(v is not None for v in column))
            for column in logprob
        ]
        table.add_section()
        table.add_row("mean log p(answer)", *(f"{m:.2f}" for m in means))
    if report.control_rows:
        table.caption = (
            f"without the needle the reference answer still wins {report.control_accuracy:.0%} "
            f"of {len(report.control_rows)} control prompts (chance "
            f"{report.config.get('chance_accuracy', 0):.0%}): accuracy near that is no retrieval"
        )
        table.caption_justify = "left"
    return table
