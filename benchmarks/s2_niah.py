"""Does a model fine-tuned with shifted sparse attention keep the NIAH accuracy of full attention?

    PYTHONPATH=. python benchmarks/s2_niah.py --from runs/learn-ruler [--out runs/s2-niah]

LongLoRA's claim (Chen et al., 2023): fine-tuning with S2-Attn and evaluating with ordinary full
attention loses little against fine-tuning with full attention. This checks it on the
`learn-ruler` experiment's main run (`make learn-ruler`), without retraining its reference:

- the start is the main run's start of that stage, the checkpoint of the stage before it
  (with `make learn-ruler`'s stages, main's short stage: full attention, on items of at most
  ~300 tokens);
- the reference is the main run's own 1K-2K stage: full attention, from that start, on that
  stage's build;
- this script trains the same stage again, from the same start on the same build with the same
  steps, lr and seed, with `attention_pattern: shifted_sparse` (groups of a quarter of each
  sample, LongLoRA's 1/4): the reference's recorded config with only the pattern and the output
  directory changed.

Both are then evaluated the same way, with full attention (training patterns never reach
evaluation): `eval niah`'s generate mode at the trained lengths, 1K and 2K, every depth, on
held-out seeds, with the no-needle control. Writes OUT/summary.json and OUT/summary.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.learn_niah import DEPTHS  # noqa: E402
from longdata.evals.niah.report import format_length  # noqa: E402
from longdata.evals.niah.report import write_outputs as write_niah  # noqa: E402
from longdata.evals.niah.run import NiahSpec, run_niah  # noqa: E402
from longdata.trainer import loop  # noqa: E402
from longdata.trainer.model import load_model  # noqa: E402
from longdata.trainer.tokenizer import load_build_tokenizer  # noqa: E402

STAGE = "1k-2k"  # learn_ruler's stage at the trained lengths


def reference_config(source: Path, stage: str) -> dict[str, Any]:
    """The reference stage's recorded config; its `model` is the start both runs share."""
    path = source / "main" / stage / "config.json"
    if not path.is_file():
        raise SystemExit(f"{path}: not found; run `make learn-ruler` (its main run) first")
    return json.loads(path.read_text())


def train_shifted_sparse(reference: dict[str, Any], out: Path) -> tuple[Path, float]:
    """The reference's stage again with its recorded settings, only the pattern changed."""
    if reference.get("attention_pattern", "full") != "full":
        raise SystemExit("the reference stage was not trained with full attention")
    changes = {"out_dir": str(out / "shifted_sparse"), "attention_pattern": "shifted_sparse"}
    started = time.perf_counter()
    result = loop.train(loop.TrainConfig(**{**reference, **changes}))
    return result.final_dir, time.perf_counter() - started


def evaluate(
    checkpoint: Path, build_dir: Path, out: Path, samples: int, lengths: tuple[int, ...]
) -> dict[str, Any]:
    tokenizer = load_build_tokenizer(build_dir)
    model = load_model(str(checkpoint), "sdpa_varlen").eval()
    spec = NiahSpec(lengths, DEPTHS, samples, "generate", 24)
    report = run_niah(model, tokenizer, spec, describe={"model": str(checkpoint)})
    write_niah(report, out)
    grid = report.grid()
    return {
        "accuracy": report.accuracy,
        "standard_error": report.needle_standard_error,
        "control_accuracy": report.control_accuracy,
        "by_length": {
            format_length(n): sum(cells) / len(cells)
            for n, cells in zip(report.lengths, grid, strict=True)
        },
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--from", dest="source", default="runs/learn-ruler")
    parser.add_argument("--out", default="runs/s2-niah")
    parser.add_argument("--stage", default=STAGE, help="the main run's stage to train again")
    parser.add_argument("--samples", type=int, default=20, help="needles per cell")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--lengths", default="1024,2048", help="eval lengths (the trained ones)")
    args = parser.parse_args(argv)
    lengths = tuple(int(n) for n in args.lengths.split(","))
    if args.threads:
        torch.set_num_threads(args.threads)
    source, out = Path(args.source), Path(args.out)
    reference = reference_config(source, args.stage)
    build_dir = Path(reference["build_dir"])
    s2_checkpoint, s2_seconds = train_shifted_sparse(reference, out)
    rows = []
    for pattern, checkpoint in (
        ("full", source / "main" / args.stage / "final"),
        ("shifted_sparse", s2_checkpoint),
    ):
        row = evaluate(checkpoint, build_dir, out / pattern / "niah", args.samples, lengths)
        rows.append({"trained_with": pattern, "checkpoint": str(checkpoint), **row})
    rows[1]["train_seconds"] = round(s2_seconds, 1)
    summary = {"source": str(source), "stage": args.stage, "start": reference["model"]}
    summary["samples_per_cell"] = args.samples
    summary["runs"] = rows
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    names = [format_length(n) for n in lengths]
    lines = [
        f"| trained with | accuracy (all lengths) | {' | '.join(names)} | no-needle control |",
        "|---|---:|" + "---:|" * len(names) + "---:|",
        *(
            f"| {r['trained_with']} | {r['accuracy']:.3f} ± {r['standard_error'] or 0:.3f} | "
            + " | ".join(f"{r['by_length'][name]:.3f}" for name in names)
            + f" | {r['control_accuracy']:.3f} |"
            for r in rows
        ),
    ]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return summary


if __name__ == "__main__":
    main()
