"""RULER results: results.json, results.csv, a task x length heatmap and a table."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from longdata.evals.niah.report import format_length, plot_accuracy_grid


def _lengths(results: dict[str, Any]) -> list[int]:
    return results["config"]["lengths"]


def _counts(results: dict[str, Any]) -> list[list[int]]:
    rows = [r for r in results["rows"] if not r["control"]]
    return [
        [sum(r["task"] == task and r["length"] == n for r in rows) for n in _lengths(results)]
        for task in results["tasks"]
    ]


def write_outputs(results: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """results.json, results.csv (one line per prompt, controls included) and heatmap.png."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "csv": out_dir / "results.csv",
        "json": out_dir / "results.json",
        "heatmap": out_dir / "heatmap.png",
    }
    with paths["csv"].open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(results["rows"][0]))
        writer.writeheader()
        writer.writerows(results["rows"])
    paths["json"].write_text(
        json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    tasks = results["tasks"]
    accuracy = [[tasks[t]["by_length"][str(n)] for n in _lengths(results)] for t in tasks]
    model = results["config"].get("model", "model")
    plot_accuracy_grid(
        accuracy,
        _counts(results),
        [format_length(n) for n in _lengths(results)],
        list(tasks),
        ("context length (prompt tokens)", "task"),
        f"RULER-style tasks: {model}\ncontrols (signal removed) and chance: see results.json",
        paths["heatmap"],
    )
    return paths


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _with_error(value: float | None, error: float | None) -> str:
    return _share(value) + ("" if error is None else f" ± {error:.2f}")


def task_table(results: dict[str, Any]) -> Any:
    """A rich table: one row per task, accuracy per length, overall ± standard error, control,
    chance, and recall (RULER's partial-credit metric) overall ± its standard error."""
    from rich.table import Table

    samples = results["config"]["samples"]
    table = Table(
        title=f"RULER-style accuracy ({samples} samples per cell)",
        title_justify="left",
        caption="accuracy: the exact answer; recall: the share of the expected items named "
        "(RULER's own metric)",
        caption_justify="left",
    )
    table.add_column("task")
    for n in _lengths(results):
        table.add_column(format_length(n), justify="right")
    for column in ("overall", "control", "chance", "recall"):
        table.add_column(column, justify="right")
    for task, summary in results["tasks"].items():
        overall = _with_error(summary["accuracy"], summary["standard_error"])
        table.add_row(
            task,
            *(_share(summary["by_length"][str(n)]) for n in _lengths(results)),
            overall,
            _share(summary["control_accuracy"]),
            # A share, as the other columns, with its tiny values visible (qa's is ~0.008).
            f"{summary['chance_accuracy']:.2g}",
            _with_error(summary["recall"], summary["recall_standard_error"]),
        )
    return table
