"""Does a longdata mix teach long-context retrieval? A tiny model learns NIAH on a CPU.

    PYTHONPATH=. python benchmarks/learn_niah.py [--out runs/learn-niah] [--jobs 3]
    make learn-niah

One run, end to end:

1. Builds two anti-haystack recipes (`recipes()`), English single-needle tasks only, packed
   into rows of 4,096 tokens: the **short** phase's (20,000 tasks of 64-256 tokens: many
   answers per row, where the copy of the code is learned first) and the **long** phase's
   (2,500 tasks of 900-2,100 tokens, the trained lengths).
2. Evaluates the random-init model (`niah-tiny` preset) with `longdata eval niah`'s pieces
   (`evals.niah.run.run_niah`, generate mode) on held-out seeds: lengths 1K and 2K, depths 0 to
   1, plus the no-needle control.
3. Trains it from scratch with the bundled trainer (per-document masks, token_mean loss): the
   short phase as three cosine cycles (warm restarts, each from the last one's checkpoint), then
   the long phase from the short phase's checkpoint (a short-to-long curriculum). Evaluates
   it after the short phase and after the long one on the same grid, then at 4K, longer than
   any training sample.
4. Ablations, each trained from the same init through the same phases on the same rows for as
   many steps and evaluated on the same grid: packing *without* per-document masks (each row
   is one causal sequence with positions running across samples: samples attend to each
   other; the loss still scores only each sample's answer), and the `sequence_mean` loss.
   `--jobs 3` trains the three side by side in three processes (each on its own copy of the
   builds).

Writes OUT/summary.md (the tables), OUT/summary.json, and per run OUT/<run>/{after_short,after,
longer}/ (results.csv, results.json, heatmap.png). `--evaluate-only` re-runs just the evals of
the runs already trained in OUT (say with more needles, `--samples-per-cell`), refusing if any
training setting differs from the one recorded in OUT/summary.json. Held-out: eval prompts are
drawn in the `longdata-eval-niah` seed namespace, which no recipe source can produce.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from functools import cache, partial
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from longdata.evals.niah.report import NiahReport, format_length, write_outputs  # noqa: E402
from longdata.evals.niah.run import NiahSpec, run_niah  # noqa: E402
from longdata.trainer import data, loop  # noqa: E402
from longdata.trainer.collation import collate  # noqa: E402
from longdata.trainer.model import load_model  # noqa: E402
from longdata.trainer.tokenizer import load_build_tokenizer  # noqa: E402

PRESET = "niah-tiny"
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
PHASES = ("short", "long")


@dataclass(frozen=True)
class Settings:
    """Everything the experiment depends on; written to OUT/summary.json."""

    out: str = "runs/learn-niah"
    short_items: int = 20_000  # the short phase's tasks
    short_lengths: tuple[int, int] = (64, 256)  # item tokens, before the chat template
    # The short phase is cosine cycles with warm restarts, each from the last one's checkpoint:
    # in a single 2,400-step cosine the copy of the code never formed (loss stuck at 0.44);
    # after a second full-lr cycle (and the long phase) 0.55 of 20 needles were right, after a
    # third 0.82 (docs/EVAL.md).
    short_cycles: tuple[int, ...] = (1_200, 1_500, 1_500)
    short_lr: float = 3e-3
    items: int = 2_500  # the long phase's tasks, at the trained lengths
    trained_lengths: tuple[int, int] = (900, 2_100)
    long_steps: int = 1_000
    long_lr: float = 2e-3
    row_tokens: int = 4_096
    warmup_steps: int = 50
    batch_size: int = 1
    ablations: bool = True
    jobs: int = 1  # training runs in parallel processes
    eval_lengths: tuple[int, ...] = (1_024, 2_048)
    longer_length: int = 4_096
    # Needles, each in every cell: the independent draws behind an accuracy (docs/EVAL.md).
    samples_per_cell: int = 20
    max_new_tokens: int = 24
    seed: int = 0
    eval_seed: int = 0
    threads: int | None = None

    def cycles(self, phase: str) -> tuple[int, ...]:
        """The phase's steps, one entry per cosine cycle."""
        return self.short_cycles if phase == "short" else (self.long_steps,)

    def phase_lr(self, phase: str) -> float:
        return self.short_lr if phase == "short" else self.long_lr


def _needles(name: str, count: int, lengths: tuple[int, int], seed: int) -> dict[str, Any]:
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


def recipes(settings: Settings) -> dict[str, dict[str, Any]]:
    """Each phase's build: anti-haystack needle tasks only, English, one needle per item. The
    sources' seeds differ, so no task repeats across phases."""
    out = Path(settings.out)
    sources = {
        "short": [_needles("needles_short", settings.short_items, settings.short_lengths, 1)],
        "long": [_needles("needles_1k_2k", settings.items, settings.trained_lengths, 2)],
    }
    return {
        phase: {
            "name": f"learn-niah-{phase}",
            "seed": settings.seed,
            "tokenizer": {"name": "builtin:quickstart"},
            "sources": sources[phase],
            "packing": {
                "max_seq_len": settings.row_tokens,
                "algorithm": "bfd",
                "overlength": "truncate",
            },
            "validation": {"fraction": 0.0, "max_samples": 0},
            "output": {
                "dir": str(out / "builds" / phase),
                "shard_size_limit": "32MB",
                "compression": "zstd",
                "card_dir": str(out / "cards" / phase),
            },
            "cache_dir": str(out / "cache"),
        }
        for phase in PHASES
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

    def collate_across_samples(rows, **options):
        return attend_across_samples(collate(rows, **options))

    with mock.patch.object(data, "collate", collate_across_samples):
        yield


@dataclass(frozen=True)
class Run:
    name: str
    loss: str = "token_mean"
    masks: bool = True  # False: packed samples attend to each other


def build_data(settings: Settings) -> dict[str, Path]:
    """Build each phase's recipe (written to OUT/recipe-<phase>.yml); {phase: build dir}."""
    from longdata.build import build

    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    builds = {}
    for phase, recipe in recipes(settings).items():
        path = out / f"recipe-{phase}.yml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        builds[phase] = build(path).out_dir
    return builds


@dataclass(frozen=True)
class Trained:
    checkpoint: Path
    losses: list[float]
    seconds: float


def cycle_name(settings: Settings, phase: str, cycle: int) -> str:
    """A cycle's output directory under OUT/<run>: the phase, numbered if it has cycles."""
    return phase if len(settings.cycles(phase)) == 1 else f"{phase}-{cycle + 1}"


def phase_checkpoint(settings: Settings, run_name: str, phase: str) -> Path:
    """The model a run has at the end of `phase`: its last cycle's final checkpoint."""
    last = len(settings.cycles(phase)) - 1
    return Path(settings.out) / run_name / cycle_name(settings, phase, last) / "final"


def train_cycle(
    settings: Settings, build_dir: Path, run: Run, phase: str, cycle: int, init: str
) -> Trained:
    """Train `run` for one cosine cycle of a phase from `init` (the preset's seeded init, or
    the previous cycle's checkpoint)."""
    config = loop.TrainConfig(
        build_dir=str(build_dir),
        out_dir=str(Path(settings.out) / run.name / cycle_name(settings, phase, cycle)),
        model=init,
        attention="sdpa_varlen",
        steps=settings.cycles(phase)[cycle],
        batch_size=settings.batch_size,
        lr=settings.phase_lr(phase),
        warmup_steps=settings.warmup_steps,
        loss=run.loss,
        seed=settings.seed,
        log_every=100,
        progress=True,
    )
    started = time.perf_counter()
    with nullcontext() if run.masks else packing_without_masks():
        result = loop.train(config)
    return Trained(
        Path(result.final_dir), [m.loss for m in result.metrics], time.perf_counter() - started
    )


def evaluate(model, tokenizer, settings: Settings, lengths, name: str, out: Path) -> NiahReport:
    spec = NiahSpec(
        tuple(lengths),
        DEPTHS,
        settings.samples_per_cell,
        "generate",
        settings.max_new_tokens,
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
    return {format_length(length): sum(row) / len(row) for length, row in zip(report.lengths, grid)}


def _summary_row(name: str, report: NiahReport) -> dict[str, Any]:
    return {
        "run": name,
        "accuracy": report.accuracy,
        "needle_standard_error": report.needle_standard_error,
        "needles": len(report.by_needle()),
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


def _mean_tail(losses: list[float], steps: int = 50) -> float:
    return sum(losses[-steps:]) / len(losses[-steps:])


def train_run(settings: Settings, builds: dict[str, Path], run: Run) -> dict[str, Any]:
    """One run through the phases' cycles from the seeded init: its summary row, no evals."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    row: dict[str, Any] = {**asdict(run), "phases": {}}
    init = PRESET
    for phase in PHASES:
        # A private copy per run, so runs in parallel never share a build directory.
        own_build = Path(settings.out) / run.name / "builds" / phase
        if not own_build.exists():
            shutil.copytree(builds[phase], own_build)
        cycles = settings.cycles(phase)
        seconds = 0.0
        for cycle, steps in enumerate(cycles):
            print(
                f"training {run.name}, {phase} phase, cycle {cycle + 1}/{len(cycles)} "
                f"({steps} steps)",
                file=sys.stderr,
            )
            trained = train_cycle(settings, own_build, run, phase, cycle, init)
            init, seconds = str(trained.checkpoint), seconds + trained.seconds
        row["phases"][phase] = {
            "steps": sum(cycles),
            "cycles": list(cycles),
            "final_loss": _mean_tail(trained.losses),
            "train_seconds": round(seconds, 1),
        }
    row["steps"] = sum(phase["steps"] for phase in row["phases"].values())
    row["final_loss"] = row["phases"][PHASES[-1]]["final_loss"]
    row["train_seconds"] = sum(phase["train_seconds"] for phase in row["phases"].values())
    return row


def evaluate_run(settings: Settings, tokenizer_dir: Path, row: dict[str, Any]) -> dict[str, Any]:
    """A trained run's evals on the grid: every run after the last phase; the main run also
    after the short phase and at the longer length. Returns the row with them filled in."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    name, out = row["name"], Path(settings.out) / row["name"]
    tokenizer = load_build_tokenizer(tokenizer_dir)
    started = time.perf_counter()
    row = {**row, "phases": {phase: dict(values) for phase, values in row["phases"].items()}}

    @cache  # the main run's last checkpoint serves two grids: load it once
    def model_after(phase: str):
        return load_model(str(phase_checkpoint(settings, name, phase)), "sdpa_varlen").eval()

    def report_for(phase: str, lengths, label: str, where: str) -> NiahReport:
        return evaluate(model_after(phase), tokenizer, settings, lengths, label, out / where)

    if name == "main":
        for phase in PHASES[:-1]:
            report = report_for(phase, settings.eval_lengths, f"{name}@{phase}", f"after_{phase}")
            row["phases"][phase]["eval"] = _summary_row(f"{name} after {phase}", report)
    row.update(_summary_row(name, report_for(PHASES[-1], settings.eval_lengths, name, "after")))
    if name == "main":
        longer = report_for(PHASES[-1], [settings.longer_length], f"{name}@longer", "longer")
        row["longer"] = _summary_row(f"{name} at {settings.longer_length}", longer)
    row["eval_seconds"] = round(time.perf_counter() - started, 1)
    return row


def train_and_evaluate(settings: Settings, builds: dict[str, Path], run: Run) -> dict[str, Any]:
    return evaluate_run(settings, builds[PHASES[0]], train_run(settings, builds, run))


# What --evaluate-only may change: the eval grid and how the work is spread over processes.
EVAL_ONLY_FIELDS = frozenset(
    {
        "samples_per_cell",
        "eval_lengths",
        "longer_length",
        "max_new_tokens",
        "eval_seed",
        "jobs",
        "threads",
        "ablations",
    }
)


def trained_runs(settings: Settings) -> dict[str, Any]:
    """The training record of a finished experiment in OUT (its summary.json), for
    --evaluate-only; refused unless it was trained with these settings."""
    path = Path(settings.out) / "summary.json"
    if not path.is_file():
        raise SystemExit(
            f"--evaluate-only: no {path}: run the experiment into {settings.out} first"
        )
    recorded = json.loads(path.read_text())
    now = json.loads(json.dumps(asdict(settings)))
    differ = sorted(
        key
        for key in now
        if key not in EVAL_ONLY_FIELDS and recorded["settings"].get(key) != now[key]
    )
    if differ:
        raise SystemExit(
            f"--evaluate-only: {path} was trained with other settings ({', '.join(differ)}); "
            "only the eval grid may change"
        )
    return recorded


def experiment(settings: Settings, evaluate_only: bool = False) -> dict[str, Any]:
    """Build, train every run and evaluate (OUT/summary.json, OUT/summary.md); with
    `evaluate_only`, re-run only the evals of the runs a finished experiment in OUT trained."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    out = Path(settings.out)
    started = time.perf_counter()
    if evaluate_only:
        recorded = trained_runs(settings)
        builds = {phase: out / "builds" / phase for phase in PHASES}
        results: dict[str, Any] = {
            "settings": asdict(settings),
            "seconds": recorded["seconds"],
            "evaluate_only": True,
        }
        work = [partial(evaluate_run, settings, builds[PHASES[0]], row) for row in recorded["runs"]]
    else:
        builds = build_data(settings)
        results = {
            "settings": asdict(settings),
            "seconds": {"build": round(time.perf_counter() - started, 1)},
        }
        runs = RUNS if settings.ablations else RUNS[:1]
        work = [partial(train_and_evaluate, settings, builds, run) for run in runs]
    first_build = builds[PHASES[0]]
    tokenizer = load_build_tokenizer(first_build)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max(1, settings.jobs), mp_context=context) as pool:
        futures = [pool.submit(job) for job in work]
        # The random init, evaluated while the runs train.
        before = load_model(PRESET, "sdpa_varlen", vocab_size=len(tokenizer), seed=settings.seed)
        loop._use_build_special_tokens(before, loop.Manifest.read(first_build))
        initial = evaluate(
            before.eval(), tokenizer, settings, settings.eval_lengths, "init", out / "init"
        )
        results["before"] = _summary_row("random init", initial)
        results["runs"] = [future.result() for future in futures]
    results["seconds"]["evaluate_only" if evaluate_only else "total"] = round(
        time.perf_counter() - started, 1
    )
    (out / "summary.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "summary.md").write_text(summary_markdown(results))
    return results


def _accuracy_text(row: dict[str, Any]) -> str:
    """`0.815 ± 0.073`: the accuracy and its standard error over needles (when there are two)."""
    spread = row["needle_standard_error"]
    return f"{row['accuracy']:.3f}" + ("" if spread is None else f" ± {spread:.3f}")


def summary_markdown(results: dict[str, Any]) -> str:
    settings = results["settings"]
    lengths = [format_length(n) for n in settings["eval_lengths"]]

    def accuracy_cells(row: dict[str, Any]) -> str:
        by_length = " | ".join(f"{row['by_length'][n]:.3f}" for n in lengths)
        return f"{_accuracy_text(row)} | {by_length} | {row['control_accuracy']:.3f}"

    lines = [
        *(
            [
                "Evals re-run by `--evaluate-only` on the recorded checkpoints; training as "
                "recorded.",
                "",
            ]
            if results.get("evaluate_only")
            else []
        ),
        f"Accuracy over {results['before']['needles']} needles, each at every depth and length "
        "(± its standard error over needles).",
        "",
        "| model | steps (short + long) | masks | loss | final train loss | accuracy (trained "
        "lengths, all depths) | " + " | ".join(lengths) + " | no-needle control | train s |",
        "|---|---:|---|---|---:|---:|" + "---:|" * len(lengths) + "---:|---:|",
        f"| random init | 0 | - | - | - | {accuracy_cells(results['before'])} | - |",
    ]
    for run in results["runs"]:
        phases = run["phases"]
        masks = "yes" if run["masks"] else "no"
        short = phases["short"]
        if "eval" in short:
            lines.append(
                f"| {run['name']}, after the short phase | {short['steps']} + 0 | {masks} | "
                f"{run['loss']} | {short['final_loss']:.3f} | {accuracy_cells(short['eval'])} | "
                f"{short['train_seconds']:.0f} |"
            )
        lines.append(
            f"| {run['name']} | {short['steps']} + {phases['long']['steps']} | {masks} | "
            f"{run['loss']} | {run['final_loss']:.3f} | {accuracy_cells(run)} | "
            f"{run['train_seconds']:.0f} |"
        )
    for run in results["runs"]:
        if "longer" in run:
            longer = run["longer"]
            lines.append("")
            lines.append(
                f"{run['name']} at {format_length(settings['longer_length'])} (longer than any "
                f"training sample): accuracy {_accuracy_text(longer)}, no-needle control "
                f"{longer['control_accuracy']:.3f} ({longer['prompts']} prompts)."
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    defaults = Settings()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=defaults.out)
    parser.add_argument("--short-items", type=int, default=defaults.short_items)
    parser.add_argument(
        "--short-cycles",
        default=",".join(map(str, defaults.short_cycles)),
        help="the short phase's steps per cosine cycle, comma-separated (warm restarts)",
    )
    parser.add_argument("--short-lr", type=float, default=defaults.short_lr)
    parser.add_argument(
        "--items",
        type=int,
        default=defaults.items,
        help="the long phase's tasks, at the trained lengths",
    )
    parser.add_argument("--long-steps", type=int, default=defaults.long_steps)
    parser.add_argument("--long-lr", type=float, default=defaults.long_lr)
    parser.add_argument("--no-ablations", action="store_true", help="train the main run only")
    parser.add_argument(
        "--jobs", type=int, default=defaults.jobs, help="training runs in parallel processes"
    )
    parser.add_argument("--samples-per-cell", type=int, default=defaults.samples_per_cell)
    parser.add_argument(
        "--eval-lengths",
        default=",".join(map(str, defaults.eval_lengths)),
        help="comma-separated prompt lengths in tokens (the trained lengths)",
    )
    parser.add_argument("--longer-length", type=int, default=defaults.longer_length)
    parser.add_argument(
        "--evaluate-only",
        action="store_true",
        help="re-run only the evals of the experiment already trained in --out (same training "
        "settings; the eval grid may change)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per process (1 with --jobs 3 on 2 cores)",
    )
    args = parser.parse_args(argv)
    settings = replace(
        defaults,
        out=args.out,
        short_items=args.short_items,
        short_cycles=tuple(int(n) for n in args.short_cycles.split(",")),
        short_lr=args.short_lr,
        items=args.items,
        long_steps=args.long_steps,
        long_lr=args.long_lr,
        ablations=not args.no_ablations,
        jobs=args.jobs,
        samples_per_cell=args.samples_per_cell,
        eval_lengths=tuple(int(n) for n in args.eval_lengths.split(",")),
        longer_length=args.longer_length,
        threads=args.threads,
    )
    results = experiment(settings, evaluate_only=args.evaluate_only)
    print(summary_markdown(results))
    return results


if __name__ == "__main__":
    main()
