"""NIAH results: the length x depth grid, results.csv / results.json, the heatmap, a table."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    control_rows: list[dict[str, Any]] | None = None  # the same questions, no needle

    def _cells(self, key: str) -> list[list[list[float]]]:
        cells: list[list[list[float]]] = [[[] for _ in self.depths] for _ in self.lengths]
        for row in self.rows:
            i, j = self.lengths.index(row["length"]), self.depths.index(row["depth"])
            cells[i][j].append(float(row[key]))
        return cells

    def grid(self, key: str = "correct") -> list[list[float | None]]:
        """Mean of `key` per cell, [length][depth]; None for an empty cell."""
        return [[sum(c) / len(c) if c else None for c in row] for row in self._cells(key)]

    def counts(self) -> list[list[int]]:
        return [[len(c) for c in row] for row in self._cells("correct")]

    @property
    def accuracy(self) -> float | None:
        return mean([r["correct"] for r in self.rows])

    def by_needle(self) -> list[dict[str, Any]]:
        """Accuracy per needle (grid sample): each needle sits in every cell, so a model that
        cannot copy one code misses it everywhere; the needles, not the prompts, are the
        independent draws behind `accuracy`."""
        needles: dict[int, dict[str, Any]] = {}
        for row in self.rows:
            needle = needles.setdefault(
                row["sample"],
                {
                    "sample": row["sample"],
                    "subject": row["subject"],
                    "expected": row["expected"],
                    "prompts": 0,
                    "correct": 0,
                },
            )
            needle["prompts"] += 1
            needle["correct"] += bool(row["correct"])
        return [
            {**needle, "accuracy": needle["correct"] / needle["prompts"]}
            for _, needle in sorted(needles.items())
        ]

    @property
    def needle_standard_error(self) -> float | None:
        """The standard error of `accuracy` over needles (None with fewer than two)."""
        return standard_error([needle["accuracy"] for needle in self.by_needle()])

    @property
    def control_accuracy(self) -> float | None:
        """How often a prompt with no needle at all still scores correct."""
        return mean([r["correct"] for r in self.control_rows or []])

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
            "needles": self.by_needle(),
            "needle_standard_error": self.needle_standard_error,
            "rows": self.rows,
        }
        if self.control_rows is not None:
            result["control"] = {
                "what": "each sample's question and candidates over filler with no needle",
                "accuracy": self.control_accuracy,
                "rows": self.control_rows,
            }
            if self.mode == "loglik":
                logprobs = [r["answer_logprob"] for r in self.control_rows]
                result["control"]["mean_answer_logprob"] = mean(logprobs)
        return result


def mean(values: Sequence[float]) -> float | None:
    """The mean (None for no values): an eval's accuracy, with nothing asked, is unknown."""
    return sum(values) / len(values) if values else None


def standard_error(values: Sequence[float]) -> float | None:
    """Standard error of the mean of independent draws (None below two)."""
    if len(values) < 2:
        return None
    centre = sum(values) / len(values)
    variance = sum((v - centre) ** 2 for v in values) / (len(values) - 1)
    return math.sqrt(variance / len(values))


def format_length(tokens: int) -> str:
    """4096 -> "4K", 131072 -> "128K", 1536 -> "1.5K", 500 -> "500" (K = 1024 tokens)."""
    if tokens >= 1024 * 1024 and tokens % (1024 * 1024) == 0:
        return f"{tokens // (1024 * 1024)}M"
    if tokens >= 1024 and (tokens * 10) % 1024 == 0:
        return f"{tokens / 1024:g}K"
    return str(tokens)


def format_share(fraction: float) -> str:
    """0.2 -> "20%", 1e-6 -> "0.0001%": small chances stay visible."""
    return f"{fraction * 100:.3g}%"


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
    accuracy = report.grid("correct")
    plot_accuracy_grid(
        [list(row) for row in zip(*accuracy)],  # [depth][length]
        [list(row) for row in zip(*report.counts())],
        [format_length(x) for x in report.lengths],
        [format_depth(d) for d in report.depths],
        ("context length (prompt tokens)", "needle depth (% of haystack)"),
        title,
        path,
    )


def plot_accuracy_grid(
    accuracy: Sequence[Sequence[float | None]],
    counts: Sequence[Sequence[int]],
    columns: Sequence[str],
    rows: Sequence[str],
    axis_labels: tuple[str, str],
    title: str,
    path: Path,
) -> None:
    """A heatmap of accuracy[row][column] in [0, 1], each scored cell labelled with its value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    values = np.array([[np.nan if v is None else v for v in row] for row in accuracy], dtype=float)
    width = max(5.0, 1.1 * len(columns) + 2.5)
    height = max(3.5, 0.55 * len(rows) + 2.0)
    figure, axes = plt.subplots(figsize=(width, height), dpi=120)
    image = axes.imshow(values, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    for d in range(values.shape[0]):
        for n in range(values.shape[1]):
            if counts[d][n] == 0:
                continue
            value = values[d, n]
            axes.text(
                n,
                d,
                f"{value:.2f}",
                ha="center",
                va="center",
                fontsize=9,
                color="black" if 0.25 < value < 0.85 else "white",
            )
    axes.set_xticks(range(len(columns)), columns)
    axes.set_yticks(range(len(rows)), rows)
    axes.set_xlabel(axis_labels[0])
    axes.set_ylabel(axis_labels[1])
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
    accuracy, spread = report.accuracy, report.needle_standard_error
    overall = "n/a" if accuracy is None else f"{accuracy:.0%}"
    if spread is not None:
        overall += f" ± {spread:.0%}"
    notes = []
    if report.config.get("chance_accuracy"):
        notes.append(f"chance {format_share(report.config['chance_accuracy'])}")
    if report.control_accuracy is not None:
        notes.append(f"without needle {report.control_accuracy:.0%}")
    note = f"\n{', '.join(notes)}" if notes else ""
    return (
        f"Needle in a haystack: {name}\n"
        f"{report.mode}, {per_cell} needle(s), each in every cell; accuracy {overall}{note}"
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
            f"without the needle {report.control_accuracy:.0%} of {len(report.control_rows)} "
            "control prompts still score correct (chance "
            f"{format_share(report.config.get('chance_accuracy', 0))}): accuracy near that is "
            "no retrieval"
        )
        table.caption_justify = "left"
    return table
