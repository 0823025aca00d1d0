"""Does the mix teach past its training length, and do the RULER-style tasks add skills?

    PYTHONPATH=. python benchmarks/learn_ruler.py [--out runs/learn-ruler] [--runs main]
    make learn-ruler    # needle_only, main, main_pose: each after its parent

Trains the `ruler-tiny` preset (niah-tiny with a long rope base) from scratch with the bundled
trainer through a short-to-long curriculum, each stage from the last one's checkpoint: two base
stages of raw text, each document a block of words written again and again (loss on every token:
the model learns to copy what followed the token it just wrote), the second with codes and names
mixed into the blocks; then the run's tasks at 64-256 tokens (per-document masks, token_mean
loss), 1K-2K and 2K-4K. Three runs (`RUNS`), each starting from its parent's checkpoint, so a
stage is trained once and shared: the **needle_only** ablation (needle tasks at every task
stage); **main** (from the ablation's base stages on, the same stages and steps with needle
tasks plus every `longdata.sources.ruler` family, mixed as `MIX` says); and **main_pose** (from
main's short stage: main's long stages again with PoSE positions up to 8K, the trainer's
`position_span`). Each is evaluated after its last stage with `eval niah`'s and `eval ruler`'s
pieces at 512 (within the training lengths), 1K, 2K, 4K and 8K (8K: twice the longest training
sample) on held-out seeds, with their no-signal controls. A stage cycle already trained with the
same config, on the same build (its manifest's sha256), from the same weights is kept, so adding
a stage or a run retrains only what changed.

Writes per run OUT/<run>/row.json and OUT/<run>/{niah,ruler}/ (results.json, heatmap.png), and
OUT/summary.json and OUT/summary.md over every run row on disk made with the same settings.
Targets (issue 25): NIAH >= 0.8 at 4K and >= 0.6 at 8K; multikey and vartrack >= 0.6 at 2K;
controls at chance.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import string
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.learn_niah import DEPTHS  # noqa: E402
from longdata.evals.niah.report import format_length  # noqa: E402
from longdata.evals.niah.report import write_outputs as write_niah  # noqa: E402
from longdata.evals.niah.run import NiahSpec, run_niah  # noqa: E402
from longdata.evals.ruler.report import write_outputs as write_ruler  # noqa: E402
from longdata.evals.ruler.run import RulerSpec, run_ruler  # noqa: E402
from longdata.sources import ruler  # noqa: E402
from longdata.trainer import loop  # noqa: E402
from longdata.trainer.model import load_model, model_config  # noqa: E402
from longdata.trainer.reporting import METRICS_FILE  # noqa: E402
from longdata.trainer.tokenizer import load_build_tokenizer  # noqa: E402

# niah-tiny with a long rope base: trained to 4K, evaluated at 8K (trainer/model.py).
PRESET = "ruler-tiny"
# In a stage cycle's run directory: what it trained on and from (`trained_on`).
TRAINED_ON = "trained-on.json"


@dataclass(frozen=True)
class Stage:
    name: str
    items: int
    lengths: tuple[int, int]  # item tokens, before the chat template
    # Steps per cosine cycle; each cycle restarts at full lr from the previous one's checkpoint.
    cycles: tuple[int, ...]
    lr: float
    # "tasks": the run's mix of anti-haystack tasks, chat-rendered, loss on the answer;
    # "repeats": raw text, each document a block of elements written again and again, loss on
    # every token: after the first time through, predictable only by copying.
    data: Literal["tasks", "repeats"] = "tasks"
    code_share: float = 0.0  # repeats: the share of elements that are codes or names, not words
    min_lr_ratio: float = loop.TrainConfig.min_lr_ratio  # 1.0: a constant lr after the warmup


@dataclass(frozen=True)
class Run:
    name: str
    # (tasks, share of a stage's items) per source; a source draws its tasks evenly.
    mix: tuple[tuple[tuple[str, ...], float], ...]
    stages: tuple[str, ...]  # its curriculum in order, by name from `Settings.stages`
    # The run this one starts from, after that run's stage `after`: the stages up to it are
    # trained once, by the parent (or its own parent), and shared.
    parent: str | None = None
    after: str | None = None
    position_span: int | None = None  # PoSE in this run's own stages (TrainConfig's)


NEEDLES = ((("needle",), 1.0),)
# Needles stay at 40% (mixed in evenly at 1/6 they halved NIAH, docs/EVAL.md); the two families
# with targets, multikey and vartrack, weigh more than the other three and are sources of their
# own, so the training log shows each one's loss.
MIX = (
    (("needle",), 0.4),
    (("multikey",), 0.2),
    (("vartrack",), 0.2),
    (("multivalue", "cwe", "qa"), 0.2),
)
CURRICULUM = ("base", "base-codes", "short", "1k-2k", "2k-4k")
RUNS = (
    # The ablation trains the base stages every run shares: there the copy forms.
    Run("needle_only", NEEDLES, CURRICULUM),
    # The same stages and steps from the base on, with every family in the mix.
    Run("main", MIX, CURRICULUM, parent="needle_only", after="base-codes"),
    # main's long stages again with PoSE positions up to the longest eval length.
    Run("main_pose", MIX, CURRICULUM, parent="main", after="short", position_span=8_192),
)
# The elements of a repeats block: one-token words (so the copy is learned token by token), and
# codes and names of the tasks' shapes (5 digits, 5 capitals), which a block of words alone
# never taught the model to copy (docs/EVAL.md).
WORDS = 512
BLOCK_ELEMENTS = (8, 32)  # the blocks in which the copy formed (docs/EVAL.md)
CODE_DIGITS = 5
TOKENIZER = "builtin:quickstart"


@dataclass(frozen=True)
class Settings:
    """Everything the experiment depends on; written to OUT/summary.json."""

    out: str = "runs/learn-ruler"
    stages: tuple[Stage, ...] = (
        # An induction copy (find the token just written earlier, continue as it went on),
        # learned at a constant lr on blocks of words, then on blocks with codes and names in.
        Stage("base", 26_000, (96, 160), (700,), 1e-3, data="repeats", min_lr_ratio=1.0),
        Stage("base-codes", 8_000, (96, 160), (400,), 1e-3, "repeats", 0.25, min_lr_ratio=1.0),
        # The run's tasks at 64-256 tokens, ~20 items a row. One cycle: a second one over the
        # same build lowered the loss and the scores at 512 (docs/EVAL.md).
        Stage("short", 20_000, (64, 256), (1_200,), 3e-3),
        Stage("1k-2k", 3_500, (900, 2_100), (1_500,), 2e-3),
        Stage("2k-4k", 2_000, (2_100, 4_000), (1_200,), 1e-3),
    )
    row_tokens: int = 4_352  # one 4K item and its chat template fit a row
    warmup_steps: int = 50
    runs: tuple[Run, ...] = RUNS  # parents before their children
    train: tuple[str, ...] | None = None  # the runs to train in this invocation (None: all)
    # 512 is within every run's training lengths: a task failed there is not learned at all,
    # rather than lost with length.
    eval_lengths: tuple[int, ...] = (512, 1_024, 2_048, 4_096, 8_192)
    samples: int = 10  # independent draws per NIAH cell and per ruler task
    max_new_tokens: int = 64  # the longest English answer (vartrack's, 4 names) is ~45 tokens
    seed: int = 0
    eval_seed: int = 0
    threads: int | None = None


def definition(settings: Settings, name: str) -> Run:
    return next(run for run in settings.runs if run.name == name)


def check_runs(settings: Settings) -> None:
    """One line naming the first run whose definition cannot be trained: a stage not in
    `Settings.stages`, or a parent that is not defined before it or does not train the stages
    it would share (its curriculum up to `after` must be the run's own)."""
    pool = {stage.name for stage in settings.stages}
    seen: dict[str, Run] = {}
    for run in settings.runs:
        unknown = [name for name in run.stages if name not in pool]
        if unknown:
            raise SystemExit(f"run {run.name}: stage {unknown[0]!r} is not in the settings' stages")
        if run.parent is not None:
            parent = seen.get(run.parent)
            if parent is None:
                raise SystemExit(f"run {run.name}: parent {run.parent!r} is not defined before it")
            if run.after not in run.stages or run.after not in parent.stages:
                raise SystemExit(
                    f"run {run.name}: {run.after!r} is not a stage of it and its parent"
                )
            shared = run.stages.index(run.after) + 1
            if run.stages[:shared] != parent.stages[:shared]:
                raise SystemExit(
                    f"run {run.name}: its stages up to {run.after!r} differ from {run.parent}'s"
                )
        seen[run.name] = run


def curriculum(settings: Settings, run: str) -> list[Stage]:
    """`run`'s stages, in the order it trains them."""
    by_name = {stage.name: stage for stage in settings.stages}
    return [by_name[name] for name in definition(settings, run).stages]


def trained_by(settings: Settings, run: str, index: int) -> str:
    """The run that trains `run`'s stage `index`: itself, or the ancestor it inherits it from
    (whose curriculum starts the same way)."""
    owner = definition(settings, run)
    names = owner.stages
    while owner.parent is not None and index <= names.index(owner.after):
        owner = definition(settings, owner.parent)
    return owner.name


def stage_seed(settings: Settings, stage: Stage) -> int:
    """The seed of a stage's data: its place in the stage list."""
    return 100 + settings.stages.index(stage)


def task_sources(settings: Settings, run: str, stage: Stage) -> list[dict[str, Any]]:
    """English anti-haystack tasks, a source per group of the run's mix. Seeds differ per stage
    and source, so no task repeats across stages."""
    return [
        {
            # The first source keeps the name and seed of learn-ruler's one-source recipes.
            "name": f"{run}_{stage.name}{f'_{group}' if group else ''}".replace("-", "_"),
            "kind": "antihaystack",
            "count": round(stage.items * share),
            "length_range": list(stage.lengths),
            "needles": [1, 1],
            "tasks": list(tasks),
            "zh_fraction": 0.0,
            "seed": stage_seed(settings, stage) + 1_000 * group,
        }
        for group, (tasks, share) in enumerate(definition(settings, run).mix)
    ]


def repeats_path(settings: Settings, run: str, stage: Stage) -> Path:
    return Path(settings.out) / run / f"repeats-{stage.name}.jsonl"


def recipe(settings: Settings, run: str, stage: Stage) -> dict[str, Any]:
    """One stage's build for `run`: its tasks, or its repeats file (`write_repeats`) as text."""
    out = Path(settings.out) / run
    if stage.data == "tasks":
        sources = task_sources(settings, run, stage)
    else:
        name = f"{run}_{stage.name}".replace("-", "_")
        path = repeats_path(settings, run, stage)
        sources = [{"name": name, "kind": "text", "path": str(path)}]
    return {
        "name": f"learn-ruler-{run}-{stage.name}",
        "seed": settings.seed,
        "tokenizer": {"name": TOKENIZER},
        "sources": sources,
        "packing": {
            "max_seq_len": settings.row_tokens,
            "algorithm": "bfd",
            "overlength": "truncate",
        },
        "validation": {"fraction": 0.0, "max_samples": 0},
        "output": {
            "dir": str(out / "builds" / stage.name),
            "shard_size_limit": "32MB",
            "compression": "zstd",
            "card_dir": str(out / "cards" / stage.name),
        },
        "cache_dir": str(Path(settings.out) / "cache"),
    }


def one_token_words(count: int, seed: int) -> list[str]:
    """`count` lowercase words that the recipes' tokenizer writes as one token after a space,
    drawn with `seed` from all it has."""
    from longdata.recipe import TokenizerConfig
    from longdata.stages.templates import load_tokenizer

    tokenizer, _ = load_tokenizer(TokenizerConfig(name=TOKENIZER), require_chat_template=False)
    candidates = sorted(
        word
        for word in {token.lstrip("Ġ") for token in tokenizer.get_vocab()}
        if len(word) >= 3
        and word.isascii()
        and word.isalpha()
        and word.islower()
        and len(tokenizer.encode(f" {word}", add_special_tokens=False)) == 1
    )
    if len(candidates) < count:
        raise SystemExit(f"{TOKENIZER}: {len(candidates)} one-token words, {count} needed")
    return random.Random(seed).sample(candidates, count)


def block_element(rng: random.Random, words: list[str], code_share: float) -> str:
    """A word, or with probability `code_share` a code or a name as the tasks write them."""
    if code_share and rng.random() < code_share:
        if rng.random() < 0.5:
            return str(rng.randrange(10 ** (CODE_DIGITS - 1), 10**CODE_DIGITS))
        return "".join(rng.choice(string.ascii_uppercase) for _ in range(CODE_DIGITS))
    return rng.choice(words)


def repeated_block(rng: random.Random, elements: int, words: list[str], code_share: float) -> str:
    """A block of `BLOCK_ELEMENTS` elements drawn afresh, written again and again up to
    `elements`: after its first time through, each element is the one that followed the same
    element the time before."""
    block = [block_element(rng, words, code_share) for _ in range(rng.randint(*BLOCK_ELEMENTS))]
    return " ".join(block[i % len(block)] for i in range(elements))


def write_repeats(settings: Settings, run: str, stage: Stage) -> Path:
    """The stage's documents as JSONL: `stage.items` repeated blocks of `stage.lengths` elements
    (as many tokens where all are words)."""
    words = one_token_words(WORDS, settings.seed)  # the same words in every stage
    rng = random.Random(stage_seed(settings, stage))
    low, high = stage.lengths
    lines = [
        json.dumps({"text": repeated_block(rng, rng.randint(low, high), words, stage.code_share)})
        for _ in range(stage.items)
    ]
    path = repeats_path(settings, run, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def stage_directory(stage: Stage, cycle: int) -> str:
    return f"{stage.name}-{cycle + 1}" if len(stage.cycles) > 1 else stage.name


def trained_on(config: loop.TrainConfig) -> dict[str, str]:
    """What a cycle's result depends on beyond its config: the build's manifest (it holds every
    shard's hash) and the starting weights (a preset's are its config with a seeded init)."""
    digest = hashlib.sha256((Path(config.build_dir) / "manifest.json").read_bytes())
    identity = {"build_manifest_sha256": digest.hexdigest()}
    if Path(config.model).is_dir():
        weights = hashlib.sha256()
        for path in sorted(Path(config.model).glob("*.safetensors")):
            weights.update(path.read_bytes())
        identity["init_weights_sha256"] = weights.hexdigest()
    else:
        preset = model_config(config.model).to_json_string()
        identity["init_preset"] = config.model
        identity["init_preset_config_sha256"] = hashlib.sha256(preset.encode()).hexdigest()
    return identity


def is_trained(config: loop.TrainConfig) -> bool:
    """Whether a stage cycle was already trained to its end with exactly `config`, on exactly
    this build, from exactly these weights (so a re-run, e.g. after adding a stage or a run,
    keeps it)."""
    out = Path(config.out_dir)
    saved, inputs = out / "config.json", out / TRAINED_ON
    if not (out / "final").is_dir() or not saved.is_file() or not inputs.is_file():
        return False
    # Read through TrainConfig: a setting added since the cycle trained takes its default.
    then = json.loads(json.dumps(asdict(loop.TrainConfig(**json.loads(saved.read_text())))))
    same_config = then == json.loads(json.dumps(asdict(config)))
    return same_config and json.loads(inputs.read_text()) == trained_on(config)


def step_records(config: loop.TrainConfig) -> list[dict[str, Any]]:
    """The cycle's metrics, one per step (it logs every step)."""
    lines = (Path(config.out_dir) / METRICS_FILE).read_text().splitlines()
    return [json.loads(line) for line in lines]


def train(settings: Settings, run: str) -> tuple[Path, Path, list[dict[str, Any]]]:
    """Build and train `run` through the stages: (last checkpoint, last build, stage rows)."""
    from longdata.build import build

    init, stages, builds = PRESET, [], []
    for index, stage in enumerate(curriculum(settings, run)):
        owner = trained_by(settings, run, index)
        if owner != run:
            base = Path(settings.out) / owner
            checkpoint = base / stage_directory(stage, len(stage.cycles) - 1) / "final"
            if not checkpoint.is_dir():
                raise SystemExit(
                    f"{checkpoint}: not found; the {owner} run trains the shared stage "
                    f"{stage.name}: run --runs {owner} first"
                )
            init = str(checkpoint)
            builds.append(base / "builds" / stage.name)
            stages.append({"stage": stage.name, "trained_by": owner})
            continue
        path = Path(settings.out) / run / f"recipe-{stage.name}.yml"
        path.parent.mkdir(parents=True, exist_ok=True)
        if stage.data == "repeats":
            write_repeats(settings, run, stage)
        path.write_text(yaml.safe_dump(recipe(settings, run, stage), sort_keys=False))
        builds.append(build(path).out_dir)
        records: list[dict[str, Any]] = []
        for cycle, steps in enumerate(stage.cycles):
            numbered = stage_directory(stage, cycle)
            config = loop.TrainConfig(
                build_dir=str(builds[-1]),
                out_dir=str(Path(settings.out) / run / numbered),
                model=init,
                attention="sdpa_varlen",
                steps=steps,
                lr=stage.lr,
                warmup_steps=settings.warmup_steps,
                min_lr_ratio=stage.min_lr_ratio,
                seed=settings.seed,
                log_every=1,  # every step in metrics.jsonl, which the stage row is made from
                progress=True,
                position_span=definition(settings, run).position_span,
            )
            if is_trained(config):
                print(
                    f"{run}, stage {numbered}: trained with these settings, kept", file=sys.stderr
                )
            else:
                print(f"training {run}, stage {numbered} ({steps} steps)", file=sys.stderr)
                identity = trained_on(config)
                loop.train(config)
                (Path(config.out_dir) / TRAINED_ON).write_text(json.dumps(identity, indent=2))
            records += step_records(config)
            init = str(Path(config.out_dir) / "final")
        last = [record["loss"] for record in records[-50:]]
        stages.append(
            {
                "stage": stage.name,
                "steps": sum(stage.cycles),
                "cycles": list(stage.cycles),
                "final_loss": sum(last) / len(last),
                "train_seconds": round(sum(record["elapsed_s"] for record in records), 1),
            }
        )
    return Path(init), builds[-1], stages


def evaluate(settings: Settings, run: str, checkpoint: Path, build_dir: Path) -> dict[str, Any]:
    """NIAH (every depth) and every ruler task at each eval length, with controls."""
    tokenizer = load_build_tokenizer(build_dir)
    model = load_model(str(checkpoint), "sdpa_varlen").eval()
    out = Path(settings.out) / run
    describe = {"model": run, "attention": "sdpa_varlen"}
    niah_spec = NiahSpec(
        settings.eval_lengths,
        DEPTHS,
        settings.samples,
        "generate",
        settings.max_new_tokens,
        seed=settings.eval_seed,
    )
    niah = run_niah(model, tokenizer, niah_spec, describe=describe)
    write_niah(niah, out / "niah")
    grid = niah.grid()
    row: dict[str, Any] = {
        "niah": {
            "by_length": {
                format_length(n): sum(cells) / len(cells) for n, cells in zip(niah.lengths, grid)
            },
            "accuracy": niah.accuracy,
            "standard_error": niah.needle_standard_error,
            "control_accuracy": niah.control_accuracy,
        }
    }
    ruler_spec = RulerSpec(
        settings.eval_lengths,
        ruler.TASKS,
        settings.samples,
        settings.max_new_tokens,
        seed=settings.eval_seed,
    )
    results = run_ruler(model, tokenizer, ruler_spec, describe=describe)
    write_ruler(results, out / "ruler")
    row["ruler"] = results["tasks"]
    return row


def summary_markdown(results: dict[str, Any]) -> str:
    """Two tables: accuracy (the exact answer, the targets' metric) per run, task and length,
    then the ruler tasks' recall (the share of the expected items named, RULER's own metric)."""
    lengths = results["settings"]["eval_lengths"]
    header = "| run | task | " + " | ".join(format_length(n) for n in lengths) + " | control |"
    rule = "|" + " --- |" * (len(lengths) + 3)

    def line(run: str, task: str, values: list[float], control: float) -> str:
        return f"| {run} | {task} | {' | '.join(f'{v:.3f}' for v in values)} | {control:.3f} |"

    accuracy, recall = [header, rule], ["Recall (RULER's metric):", "", header, rule]
    for run in results["runs"]:
        niah = run["niah"]
        by_length = [niah["by_length"][format_length(n)] for n in lengths]
        accuracy.append(line(run["run"], "niah", by_length, niah["control_accuracy"]))
        for task, summary in run["ruler"].items():
            by_length = [summary["by_length"][str(n)] for n in lengths]
            accuracy.append(line(run["run"], task, by_length, summary["control_accuracy"]))
            by_length = [summary["recall_by_length"][str(n)] for n in lengths]
            recall.append(line(run["run"], task, by_length, summary["control_recall"]))
    return "\n".join(accuracy) + "\n\n" + "\n".join(recall) + "\n"


def shared_settings(settings: Settings) -> dict[str, Any]:
    """The settings two runs must share to sit in one table (beside each run's own definition;
    not which runs are defined or trained here, not threads)."""
    return {k: v for k, v in asdict(settings).items() if k not in ("runs", "train", "threads")}


def experiment(settings: Settings) -> dict[str, Any]:
    """Train and evaluate `settings.runs`; each run's row is kept in OUT/<run>/row.json, and
    OUT/summary.* gather every run row on disk made with the same settings, so the runs can
    train in separate invocations (main's long stages beside another process's work)."""
    check_runs(settings)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    out = Path(settings.out)
    names = [run.name for run in settings.runs]
    for run in settings.train if settings.train is not None else names:
        started = time.perf_counter()
        checkpoint, build_dir, stages = train(settings, run)
        row = {"run": run, "stages": stages, **evaluate(settings, run, checkpoint, build_dir)}
        row["seconds"] = round(time.perf_counter() - started, 1)
        kept = {
            "settings": shared_settings(settings),
            "definition": asdict(definition(settings, run)),
            "row": row,
        }
        (out / run / "row.json").write_text(json.dumps(kept, indent=2) + "\n")
    results: dict[str, Any] = {"settings": shared_settings(settings), "runs": []}
    for run in settings.runs:
        path = out / run.name / "row.json"
        if path.is_file():
            kept = json.loads(path.read_text())
            now = {"settings": results["settings"], "definition": asdict(run)}
            if {key: kept[key] for key in now} == json.loads(json.dumps(now)):
                results["runs"].append(kept["row"])
    (out / "summary.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "summary.md").write_text(summary_markdown(results))
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    defaults = Settings()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=defaults.out)
    names = [run.name for run in defaults.runs]
    parser.add_argument(
        "--runs",
        default=",".join(names),
        help="comma-separated runs to train here (default: all, in this order: a run starts "
        "from its parent's checkpoint)",
    )
    parser.add_argument("--samples", type=int, default=defaults.samples)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.runs.split(",")) - set(names))
    if unknown:
        parser.error(f"--runs: unknown {', '.join(unknown)}; known: {', '.join(names)}")
    settings = replace(
        defaults,
        out=args.out,
        train=tuple(args.runs.split(",")),
        samples=args.samples,
        threads=args.threads,
    )
    results = experiment(settings)
    print(summary_markdown(results))
    return results


if __name__ == "__main__":
    main()
