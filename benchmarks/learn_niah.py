"""Does a longdata mix teach long-context retrieval? A tiny model learns NIAH on a CPU.

    PYTHONPATH=. python benchmarks/learn_niah.py [--out runs/learn-niah] [--threads 2]
    make learn-niah

One run, end to end:

1. Builds an anti-haystack recipe (`recipe()`): 1,200 English needle tasks of 900-2,100
   tokens (the trained lengths, 1K-2K) and 8,000 shorter ones of 64-512 tokens (cheap
   retrieval practice with many answer tokens), packed into rows of 4,096 tokens.
2. Evaluates the random-init model (`niah-tiny` preset) with `longdata eval niah`'s pieces
   (`evals.niah.run.run_niah`, generate mode) on held-out seeds: lengths 1K and 2K, depths 0 to
   1, plus the no-needle control.
3. Trains it from scratch with the bundled trainer (per-document masks, token_mean loss) and
   evaluates it again on the same grid, then at 4K, longer than any training sample.
4. Ablations, each trained from the same init on the same rows for as many steps and
   evaluated on the same grid: packing *without* per-document masks (each row is one causal
   sequence with positions running across samples: samples attend to each other; the loss
   still scores only each sample's answer), and the `sequence_mean` loss. `--jobs 3` trains
   the three side by side in three processes (each on its own copy of the build).

Writes OUT/summary.md (the tables), OUT/summary.json, and per run OUT/<run>/{before,after,
longer}/ (results.csv, results.json, heatmap.png). Held-out: eval prompts are drawn in the
`longdata-eval-niah` seed namespace, which no recipe source can produce.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from evals.niah.report import NiahReport, format_length, write_outputs  # noqa: E402
from evals.niah.run import NiahSpec, run_niah  # noqa: E402
from trainer import loop  # noqa: E402
from trainer.collation import collate  # noqa: E402
from trainer.model import load_model  # noqa: E402
from trainer.tokenizer import load_build_tokenizer  # noqa: E402

PRESET = "niah-tiny"
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class Settings:
    """Everything the experiment depends on; written to OUT/summary.json."""

    out: str = "runs/learn-niah"
    items: int = 1200  # needle items at the trained lengths
    trained_lengths: tuple[int, int] = (900, 2100)  # item tokens, before the chat template
    short_items: int = 8000  # shorter needle items: cheap retrieval practice, many targets
    short_lengths: tuple[int, int] = (64, 512)
    row_tokens: int = 4096
    steps: int = 700
    ablations: bool = True
    jobs: int = 1  # training runs in parallel processes
    batch_size: int = 1
    lr: float = 3e-3
    warmup_steps: int = 50
    eval_lengths: tuple[int, ...] = (1024, 2048)
    longer_length: int = 4096
    samples_per_cell: int = 4
    max_new_tokens: int = 24
    seed: int = 0
    eval_seed: int = 0
    threads: int | None = None


def recipe(settings: Settings) -> dict[str, Any]:
    """The build: anti-haystack needle tasks only, English, one needle per item."""
    out = Path(settings.out)

    def needles(name: str, count: int, lengths: tuple[int, int], seed: int) -> dict[str, Any]:
        return {
            "name": name,
            "kind": "antihaystack",
            "count": count,
            "length_range": list(lengths),
            "depth_range": [0.0, 1.0],
            "needles": [1, 1],
            "tasks": ["needle"],
            "zh_fraction": 0.0,
            "seed": seed,
        }

    return {
        "name": "learn-niah",
        "seed": settings.seed,
        "tokenizer": {"name": "builtin:quickstart"},
        "sources": [
            needles("needles_1k_2k", settings.items, settings.trained_lengths, 1),
            needles("needles_short", settings.short_items, settings.short_lengths, 2),
        ],
        "packing": {
            "max_seq_len": settings.row_tokens,
            "algorithm": "bfd",
            "overlength": "truncate",
        },
        "validation": {"fraction": 0.0, "max_samples": 0},
        "output": {
            "dir": str(out / "build"),
            "shard_size_limit": "32MB",
            "compression": "zstd",
            "card_dir": str(out / "cards"),
        },
        "cache_dir": str(out / "cache"),
    }


def attend_across_samples(batch: dict[str, Any]) -> dict[str, Any]:
    """The ablation's packing: every row one causal sequence, positions 0..T-1 across its
    samples, so a sample attends to the samples before it in the row. Labels (and so the
    tokens the loss scores) are unchanged."""
    rows, length = batch["input_ids"].shape
    crossed = dict(batch)
    crossed["position_ids"] = torch.arange(length).expand(rows, length).clone()
    crossed["document_ids"] = torch.arange(rows, dtype=torch.int32)[:, None].expand(rows, length)
    crossed["cu_seqlens"] = torch.arange(rows + 1, dtype=torch.int32) * length
    crossed["max_seqlen"] = length
    return crossed


@contextmanager
def packing_without_masks():
    """Feed the trainer `attend_across_samples` batches (the ablation only)."""
    from streaming import StreamingDataLoader

    def make_dataloader(dataset, batch_size, pad_to_multiple_of=None):
        collate_rows = partial(collate, pad_to_multiple_of=pad_to_multiple_of)
        return StreamingDataLoader(
            dataset, batch_size=batch_size, num_workers=0,
            collate_fn=lambda rows: attend_across_samples(collate_rows(rows)),
        )

    with mock.patch.object(loop, "make_dataloader", make_dataloader):
        yield


@dataclass(frozen=True)
class Run:
    name: str
    loss: str = "token_mean"
    masks: bool = True  # False: packed samples attend to each other


def build_data(settings: Settings) -> Path:
    from longdata.build import build

    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe(settings), sort_keys=False))
    return build(path).out_dir


def train_run(settings: Settings, build_dir: Path, run: Run) -> tuple[Path, list[float], float]:
    """Train `run` from the preset's seeded init; (checkpoint, losses, seconds)."""
    config = loop.TrainConfig(
        build_dir=str(build_dir),
        out_dir=str(Path(settings.out) / run.name),
        model=PRESET,
        attention="sdpa_varlen",
        steps=settings.steps,
        batch_size=settings.batch_size,
        lr=settings.lr,
        warmup_steps=settings.warmup_steps,
        loss=run.loss,
        seed=settings.seed,
        log_every=50,
        progress=True,
    )
    started = time.perf_counter()
    if run.masks:
        result = loop.train(config)
    else:
        with packing_without_masks():
            result = loop.train(config)
    losses = [m.loss for m in result.metrics]
    return Path(result.final_dir), losses, time.perf_counter() - started


def evaluate(model, tokenizer, settings: Settings, lengths, name: str, out: Path) -> NiahReport:
    spec = NiahSpec(
        tuple(lengths), DEPTHS, settings.samples_per_cell, "generate", settings.max_new_tokens,
        seed=settings.eval_seed,
    )
    started = time.perf_counter()
    report = run_niah(model, tokenizer, spec, describe={"model": name, "attention": "sdpa_varlen"})
    write_outputs(report, out)
    print(
        f"  {name}: accuracy {report.accuracy:.3f}, no-needle control "
        f"{report.control_accuracy:.3f} ({time.perf_counter() - started:.0f}s)",
        file=sys.stderr,
    )
    return report


def _by_length(report: NiahReport) -> dict[str, float]:
    grid = report.grid()
    return {
        format_length(length): sum(row) / len(row) for length, row in zip(report.lengths, grid)
    }


def _summary_row(name: str, report: NiahReport) -> dict[str, Any]:
    return {
        "run": name,
        "accuracy": report.accuracy,
        "by_length": _by_length(report),
        "control_accuracy": report.control_accuracy,
        "prompts": len(report.rows),
        "controls": len(report.control_rows or []),
    }


RUNS = (
    Run("main"),
    Run("no_masks", masks=False),
    Run("sequence_mean", loss="sequence_mean"),
)


def train_and_evaluate(settings: Settings, build_dir: Path, run: Run) -> dict[str, Any]:
    """One training run from the seeded init, then its evals: a summary row."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    out = Path(settings.out) / run.name
    # A private copy: streaming refuses two unrelated readers of one local directory.
    own_build = out / "build"
    if not own_build.exists():
        shutil.copytree(build_dir, own_build)
    tokenizer = load_build_tokenizer(own_build)
    print(f"training {run.name} ({settings.steps} steps)", file=sys.stderr)
    checkpoint, losses, train_seconds = train_run(settings, own_build, run)
    model = load_model(str(checkpoint), "sdpa_varlen").eval()
    clock = time.perf_counter()
    after = evaluate(model, tokenizer, settings, settings.eval_lengths, run.name, out / "after")
    row = {
        **asdict(run),
        **_summary_row(run.name, after),
        "steps": settings.steps,
        "final_loss": sum(losses[-50:]) / len(losses[-50:]),
        "train_seconds": round(train_seconds, 1),
    }
    if run.name == "main":
        longer = evaluate(
            model, tokenizer, settings, [settings.longer_length], f"{run.name}@longer",
            out / "longer",
        )
        row["longer"] = _summary_row(f"{run.name} at {settings.longer_length}", longer)
    row["eval_seconds"] = round(time.perf_counter() - clock, 1)
    return row


def experiment(settings: Settings) -> dict[str, Any]:
    if settings.threads:
        torch.set_num_threads(settings.threads)
    out = Path(settings.out)
    started = time.perf_counter()
    build_dir = build_data(settings)
    tokenizer = load_build_tokenizer(build_dir)
    results: dict[str, Any] = {
        "settings": asdict(settings), "seconds": {"build": round(time.perf_counter() - started, 1)}
    }
    runs = list(RUNS if settings.ablations else RUNS[:1])
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max(1, settings.jobs), mp_context=context) as pool:
        futures = [pool.submit(train_and_evaluate, settings, build_dir, run) for run in runs]
        # The random init, evaluated while the runs train.
        before = load_model(PRESET, "sdpa_varlen", vocab_size=len(tokenizer), seed=settings.seed)
        loop._use_build_special_tokens(before, loop.Manifest.read(build_dir))
        initial = evaluate(
            before.eval(), tokenizer, settings, settings.eval_lengths, "init", out / "init"
        )
        results["before"] = _summary_row("random init", initial)
        results["runs"] = [future.result() for future in futures]
    results["seconds"]["total"] = round(time.perf_counter() - started, 1)
    (out / "summary.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "summary.md").write_text(summary_markdown(results))
    return results


def summary_markdown(results: dict[str, Any]) -> str:
    settings = results["settings"]
    lengths = [format_length(n) for n in settings["eval_lengths"]]
    lines = [
        "| model | steps | masks | loss | final train loss | accuracy (trained lengths) | "
        + " | ".join(lengths)
        + " | no-needle control | train s |",
        "|---|---:|---|---|---:|---:|" + "---:|" * len(lengths) + "---:|---:|",
    ]
    before = results["before"]
    lines.append(
        f"| random init | 0 | - | - | - | {before['accuracy']:.3f} | "
        + " | ".join(f"{before['by_length'][n]:.3f}" for n in lengths)
        + f" | {before['control_accuracy']:.3f} | - |"
    )
    for run in results["runs"]:
        lines.append(
            f"| {run['name']} | {run['steps']} | {'yes' if run['masks'] else 'no'} | "
            f"{run['loss']} | {run['final_loss']:.3f} | {run['accuracy']:.3f} | "
            + " | ".join(f"{run['by_length'][n]:.3f}" for n in lengths)
            + f" | {run['control_accuracy']:.3f} | {run['train_seconds']:.0f} |"
        )
    for run in results["runs"]:
        if "longer" in run:
            longer = run["longer"]
            lines.append("")
            lines.append(
                f"{run['name']} at {format_length(settings['longer_length'])} (longer than any "
                f"training sample): accuracy {longer['accuracy']:.3f}, no-needle control "
                f"{longer['control_accuracy']:.3f} ({longer['prompts']} prompts)."
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    defaults = Settings()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=defaults.out)
    parser.add_argument("--items", type=int, default=defaults.items)
    parser.add_argument("--short-items", type=int, default=defaults.short_items)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--no-ablations", action="store_true", help="train the main run only")
    parser.add_argument(
        "--jobs", type=int, default=defaults.jobs, help="training runs in parallel processes"
    )
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--samples-per-cell", type=int, default=defaults.samples_per_cell)
    parser.add_argument(
        "--eval-lengths", default=",".join(map(str, defaults.eval_lengths)),
        help="comma-separated prompt lengths in tokens (the trained lengths)",
    )
    parser.add_argument("--longer-length", type=int, default=defaults.longer_length)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    settings = replace(
        defaults,
        out=args.out,
        items=args.items,
        short_items=args.short_items,
        steps=args.steps,
        ablations=not args.no_ablations,
        jobs=args.jobs,
        lr=args.lr,
        samples_per_cell=args.samples_per_cell,
        eval_lengths=tuple(int(n) for n in args.eval_lengths.split(",")),
        longer_length=args.longer_length,
        threads=args.threads,
    )
    results = experiment(settings)
    print(summary_markdown(results))
    return results


if __name__ == "__main__":
    main()
