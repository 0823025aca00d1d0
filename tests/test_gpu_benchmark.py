"""benchmarks/gpu.py imports without a GPU, and its dry run writes the planned rows."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest


def test_dry_run_writes_every_planned_row_as_json_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gpu = importlib.import_module("benchmarks.gpu")
    out = tmp_path / "gpu.jsonl"
    argv = ["gpu.py", "--dry-run", "--out", str(out), "--lengths", "32768,131072"]
    monkeypatch.setattr(sys, "argv", argv)
    gpu.main()
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    planned = [line for line in lines if line["kind"] == "planned"]
    runs_per_length = len(gpu.TECHNIQUES) + len(gpu.WEIGHT_ROWS)
    assert len(planned) == 2 * runs_per_length
    by_weights = {(p["tokens"], p["weights"]): p for p in planned if p["techniques"] == "+offload"}
    for tokens in (32768, 131072):
        fp8, bf16 = by_weights[tokens, "fp8"], by_weights[tokens, "bf16"]
        assert fp8["weight_gib"] < bf16["weight_gib"] < by_weights[tokens, "fp32"]["weight_gib"]
        assert fp8["planned_gib"] < bf16["planned_gib"]
    (longest,) = [line for line in lines if line["kind"] == "longest_row"]
    assert longest["longest_row"] > 131072 and longest["planned_gib"] <= longest["device_gib"]
