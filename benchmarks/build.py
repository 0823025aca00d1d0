"""Build throughput and memory: `longdata build` against raw `tokenizers` and a TRL-style pipeline.

Same input and tokenizer for every contender, each timed ``--rounds`` times (default 3),
interleaved (floor, longdata, TRL, floor, longdata, TRL, ...) on a shared machine: every run
prints the 1-minute load average it started at, and the table and ratios use each contender's
best run, so that one load spike cannot decide a ratio.

1. raw: ``backend_tokenizer.encode_batch`` over the already-rendered chat texts (rendered once;
   only the encode calls are timed), and ``encode_batch_fast`` (the same without character
   offsets) on the same batches, interleaved: the physical limits of any pipeline using this
   tokenizer with and without offsets. Ratios are quoted against ``encode_batch``, the issue's
   reference, and against ``encode_batch_fast``, the lower of the two floors longdata itself
   uses;
2. longdata: the whole ``longdata build`` in a child process (read, normalise, render, tokenize,
   mix, pack, write MDS, card) on a cold cache, at the base size and at ``--scale`` times it;
3. TRL-style: ``datasets.load_dataset("json")`` + batched ``map`` (chat template + tokenize,
   ``num_proc``) + ``trl.data_utils.pack_dataset(strategy="bfd")``, in a child process run by
   ``--trl-python`` (default: this Python), timed by the child itself without its imports;
4. peak RSS of each child (``os.wait4`` rusage: the child's own high-water mark, which counts
   resident pages of the memory-mapped token cache it touched, not the kernel's page cache);
5. incremental rebuild: mix weight and max length changed with ``--set``; the token cache is reused;
6. with ``--near-dedup``: two more warm rebuilds, exact dedup only and with ``dedup.near``
   (threshold 0.8, 128 permutations, 5-token shingles), whose mix-stage seconds differ by the cost
   of near-duplicate search over every cached token.

    python benchmarks/build.py --mb 100 --scale 10 --trl-python /tmp/buildbench-venv/bin/python

With ``--engine ray`` it compares instead the same cold build run locally and with the Ray
executor on a Ray instance of 1 and of 2 worker processes (``num_cpus``): the overhead of Ray
against the local build and the tokenize stage's throughput per worker count.

    python benchmarks/build.py --engine ray --mb 100
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_SEQ_LEN = 32768
QUESTIONS = (
    "Summarise the document above.",
    "What does the text say about the harbour?",
    "List the main events described.",
    "请概括上文的主要内容。",
)


def write_longalign_jsonl(path: Path, megabytes: float, seed: int = 0) -> None:
    """LongAlign-10k-schema rows: a long document plus question, one answer; a quarter of the
    rows have a second question/answer round. Documents are drawn from a paragraph pool so that
    gigabytes are generated in seconds while every row stays unique."""
    from longdata.sources import synthetic

    rng = random.Random(seed)
    pool = {lang: [synthetic.paragraph(rng, lang) for _ in range(3000)] for lang in synthetic.LANGS}
    target = int(megabytes * 1e6)
    partial = path.with_name(path.name + ".partial")
    written = 0
    with partial.open("wb") as out:
        while written < target:
            lang = "zh" if rng.random() < 0.1 else "en"
            paragraphs = pool[lang]
            n_chars = rng.randint(20_000, 160_000) // (3 if lang == "zh" else 1)
            document, size = [], 0
            while size < n_chars:
                document.append(rng.choice(paragraphs))
                size += len(document[-1])
            messages = [
                {"role": "user", "content": "\n\n".join(document) + "\n\n" + rng.choice(QUESTIONS)},
                {
                    "role": "assistant",
                    "content": " ".join(rng.choices(paragraphs, k=rng.randint(1, 4))),
                },
            ]
            if rng.random() < 0.25:
                messages += [
                    {"role": "user", "content": rng.choice(QUESTIONS)},
                    {"role": "assistant", "content": rng.choice(paragraphs)},
                ]
            line = (json.dumps({"messages": messages}, ensure_ascii=False) + "\n").encode("utf-8")
            written += out.write(line)
    partial.replace(path)


def input_file(workdir: Path, megabytes: float) -> Path:
    path = workdir / f"longalign-{megabytes:g}mb.jsonl"
    if not path.exists():
        started = time.perf_counter()
        write_longalign_jsonl(path, megabytes)
        print(
            f"generated {path} ({path.stat().st_size / 1e6:,.0f} MB) in "
            f"{time.perf_counter() - started:.0f}s",
            file=sys.stderr,
        )
    return path


def rendered_batches(path: Path) -> tuple[object, list[list[str]]]:
    """The quickstart tokenizer's backend and the chat texts of ``path`` rendered once, cut into
    the build's batches: every floor run then times the same encode calls and nothing else."""
    from longdata.recipe import TokenizerConfig
    from longdata.sources.readers import iter_jsonl
    from longdata.sources.schemas import parse_messages
    from longdata.stages.templates import ChatRenderer, load_tokenizer
    from longdata.stages.tokenization import BATCH_CHARS

    tokenizer, _ = load_tokenizer(TokenizerConfig(name="builtin:quickstart"))
    renderer = ChatRenderer(tokenizer)
    batches, batch, chars = [], [], 0
    for _, row in iter_jsonl(path):
        batch.append(renderer.render(parse_messages(row)).text)
        chars += len(batch[-1])
        if chars >= BATCH_CHARS:
            batches.append(batch)
            batch, chars = [], 0
    if batch:
        batches.append(batch)
    return tokenizer.backend_tokenizer, batches


def raw_tokenizer_rate(backend, batches: list[list[str]]) -> dict:
    """Seconds of encode_batch and of encode_batch_fast alone over the rendered texts, in the
    build's batch sizes, alternating per batch so that both see the same machine load."""
    tokens, seconds = 0, {"offsets": 0.0, "fast": 0.0}
    for texts in batches:
        for kind, method in (
            ("offsets", backend.encode_batch),
            ("fast", backend.encode_batch_fast),
        ):
            started = time.perf_counter()
            encodings = method(texts, add_special_tokens=False)
            counted = sum(len(e) for e in encodings)
            del encodings  # freeing is part of the cost: offsets make it much slower
            seconds[kind] += time.perf_counter() - started
        tokens += counted
    return {"tokens": tokens, "seconds": seconds}


def run_child(
    args: list[str], env: dict | None = None, python: str = sys.executable
) -> tuple[float, int, str]:
    """(wall seconds, peak RSS in bytes, stdout) of one child process run by ``python``."""
    started = time.perf_counter()
    child = subprocess.Popen(
        [python, *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )
    stdout = child.stdout.read().decode()
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"{' '.join(args)} failed with status {status}")
    return seconds, usage.ru_maxrss * 1024, stdout


def write_recipe(workdir: Path, data: Path, name: str) -> Path:
    recipe = workdir / f"{name}.yml"
    recipe.write_text(
        json.dumps(
            {
                "name": name,
                "seed": 0,
                "tokenizer": {"name": "builtin:quickstart"},
                "sources": [
                    {"name": "longalign", "kind": "longalign", "path": str(data), "weight": 1.0}
                ],
                "packing": {
                    "max_seq_len": MAX_SEQ_LEN,
                    "algorithm": "bfd",
                    "overlength": "truncate",
                },
                "validation": {"fraction": 0.01, "max_samples": 16},
                "cache_dir": str(workdir / f"cache-{name}"),
                "output": {
                    "dir": str(workdir / f"out-{name}"),
                    "card_dir": str(workdir / "cards"),
                    "shard_size_limit": "64MB",
                    "compression": "zstd",
                },
            }
        )
    )
    return recipe


def longdata_build(
    workdir: Path, data: Path, name: str, overrides: tuple[str, ...] = (), cold: bool = True
) -> dict:
    recipe = write_recipe(workdir, data, name)
    if cold:
        shutil.rmtree(workdir / f"cache-{name}", ignore_errors=True)
    sets = [arg for override in overrides for arg in ("--set", override)]
    wall, rss, _ = run_child(["-m", "longdata.cli", "build", str(recipe), *sets])
    out = workdir / f"out-{name}"
    manifest = json.loads((out / "manifest.json").read_text())
    info = json.loads((out / "build_info.json").read_text())
    return {
        "tokens": manifest["totals"]["tokens"],
        "wall": wall,
        "rss": rss,
        "build_seconds": info["finished_at"] - info["started_at"],
        "stages": info["seconds"],
        "cached": info["cached_sources"],
        "near_duplicates": sum(s["mix"].get("near_duplicates", 0) for s in manifest["sources"]),
    }


RAY_CHILD = """
import sys
from longdata.build import build
from longdata.executors.ray import RayExecutor
executor = RayExecutor(num_cpus=int(sys.argv[2]), object_store_memory=256 << 20)
try:
    build(sys.argv[1], executor=executor)
finally:
    executor.close()
"""


def ray_build(workdir: Path, data: Path, name: str, workers: int) -> dict:
    """A cold build with the Ray executor on a fresh Ray instance of ``workers`` CPUs."""
    recipe = write_recipe(workdir, data, name)
    shutil.rmtree(workdir / f"cache-{name}", ignore_errors=True)
    wall, rss, _ = run_child(["-c", RAY_CHILD, str(recipe), str(workers)])
    out = workdir / f"out-{name}"
    manifest = json.loads((out / "manifest.json").read_text())
    info = json.loads((out / "build_info.json").read_text())
    return {
        "tokens": manifest["totals"]["tokens"],
        "wall": wall,
        "rss": rss,
        "build_seconds": info["finished_at"] - info["started_at"],
        "stages": info["seconds"],
        "manifest": manifest,
    }


def ray_comparison(workdir: Path, data: Path) -> None:
    """Local against Ray (1 and 2 workers) on the same input; the builds must be equal."""
    local = longdata_build(workdir, data, "local")
    local_manifest = json.loads((workdir / "out-local" / "manifest.json").read_text())
    runs = {workers: ray_build(workdir, data, f"ray{workers}", workers) for workers in (1, 2)}
    for run in runs.values():  # each build has its own name and directories; the data must agree
        assert all(
            run["manifest"][k] == local_manifest[k] for k in ("sources", "splits", "totals")
        ), "the Ray build differs from the local one"
    print(
        f"\ninput {data.name}, tokenizer builtin:quickstart, "
        f"load average now {os.getloadavg()[0]:.2f}"
    )
    print(
        "| engine | workers | build() s | whole process s | read + tokenize s | tokenize M tok/s "
        "| build() vs local |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    rows = [("local", 1, local), *(("ray", w, run) for w, run in runs.items())]
    for engine, workers, run in rows:
        tokenize = run["stages"]["read_tokenize"]
        print(
            f"| {engine} | {workers} | {run['build_seconds']:.1f} | {run['wall']:.1f} "
            f"| {tokenize:.1f} | {run['tokens'] / tokenize / 1e6:.3f} "
            f"| {run['build_seconds'] / local['build_seconds']:.2f}x |"
        )
    print(
        f"ray overhead against local, both on every core (2 workers): build() "
        f"{runs[2]['build_seconds'] / local['build_seconds'] - 1:+.1%}, whole process "
        f"{runs[2]['wall'] / local['wall'] - 1:+.1%}"
    )
    print(
        f"ray tokenize throughput 2 workers / 1 worker: "
        f"{runs[1]['stages']['read_tokenize'] / runs[2]['stages']['read_tokenize']:.2f}x"
    )
    for engine, workers, run in rows:
        print(
            f"stage seconds {engine} x{workers}: "
            f"{json.dumps({k: round(v, 1) for k, v in run['stages'].items()})}"
        )


def trl_pipeline(path: str, num_proc: int) -> None:
    """Child-process body: the TRL-style pipeline; prints its token count and seconds as JSON."""
    import tempfile

    import datasets
    from trl.data_utils import pack_dataset

    from longdata.recipe import TokenizerConfig
    from longdata.stages.templates import load_tokenizer

    tokenizer, _ = load_tokenizer(TokenizerConfig(name="builtin:quickstart"))

    def render_and_tokenize(batch):
        texts = [tokenizer.apply_chat_template(m, tokenize=False) for m in batch["messages"]]
        return tokenizer(texts, add_special_tokens=False)

    with tempfile.TemporaryDirectory() as cache:
        started = time.perf_counter()
        dataset = datasets.load_dataset("json", data_files=path, split="train", cache_dir=cache)
        dataset = dataset.map(
            render_and_tokenize,
            batched=True,
            num_proc=num_proc,
            remove_columns=dataset.column_names,
        )
        packed = pack_dataset(
            dataset, MAX_SEQ_LEN, strategy="bfd", map_kwargs={"num_proc": num_proc}
        )
        seconds = time.perf_counter() - started
        tokens = sum(len(ids) for ids in dataset.with_format("arrow")["input_ids"].to_pylist())
    print(json.dumps({"tokens": tokens, "seconds": seconds, "rows": len(packed)}))


def trl_run(data: Path, num_proc: int, python: str) -> dict:
    """One TRL-style child: its own timer (imports and tokenizer load excluded), its process wall
    and peak RSS."""
    wall, rss, stdout = run_child(
        [
            str(Path(__file__).relative_to(ROOT)),
            "--trl-child",
            str(data),
            "--num-proc",
            str(num_proc),
        ],
        python=python,
    )
    return {**json.loads(stdout.strip().splitlines()[-1]), "wall": wall, "rss": rss}


def interleaved_rounds(args: argparse.Namespace, data: Path) -> dict[str, list[dict]]:
    """Each contender timed ``args.rounds`` times in turn (floor, longdata, TRL, floor, ...), so
    that a load spike on the shared machine hits one run of one contender, not one contender's
    every run; each run records the 1-minute load average when it started."""
    backend, batches = rendered_batches(data)
    runs: dict[str, list[dict]] = {"floor": [], "longdata": [], "trl": []}
    for round_ in range(1, args.rounds + 1):
        load = os.getloadavg()[0]
        floor = {**raw_tokenizer_rate(backend, batches), "load": load}
        runs["floor"].append(floor)
        print(
            f"round {round_}: floor encode_batch_fast {floor['seconds']['fast']:.1f}s, "
            f"encode_batch {floor['seconds']['offsets']:.1f}s (load {load:.2f})",
            file=sys.stderr,
        )
        load = os.getloadavg()[0]
        cold = {**longdata_build(args.workdir, data, "base"), "load": load}
        runs["longdata"].append(cold)
        print(
            f"round {round_}: longdata whole process {cold['wall']:.1f}s, build() "
            f"{cold['build_seconds']:.1f}s (load {load:.2f}) stages "
            f"{json.dumps({k: round(v, 1) for k, v in cold['stages'].items()})}",
            file=sys.stderr,
        )
        if not args.skip_trl:
            load = os.getloadavg()[0]
            trl = {**trl_run(data, args.num_proc, args.trl_python), "load": load}
            runs["trl"].append(trl)
            print(
                f"round {round_}: TRL-style {trl['seconds']:.1f}s timed, process "
                f"{trl['wall']:.1f}s (load {load:.2f})",
                file=sys.stderr,
            )
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mb", type=float, default=100, help="base input size in MB of JSONL")
    parser.add_argument(
        "--scale", type=float, default=10, help="memory check at --mb times this (0: skip)"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved runs per contender (best one kept)"
    )
    parser.add_argument("--workdir", type=Path, default=ROOT / "build" / "bench-build")
    parser.add_argument("--num-proc", type=int, default=os.cpu_count(), help="TRL map workers")
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument(
        "--trl-python",
        default=sys.executable,
        help="the Python that runs the TRL-style child (one with trl and datasets installed)",
    )
    parser.add_argument(
        "--near-dedup", action="store_true", help="also time dedup.near on the cache"
    )
    parser.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="ray: compare local and Ray executor builds instead (see above)",
    )
    parser.add_argument("--trl-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_child:
        trl_pipeline(args.trl_child, args.num_proc)
        return
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"load average at start: {os.getloadavg()[0]:.2f}", file=sys.stderr)
    data = input_file(args.workdir, args.mb)
    if args.engine == "ray":
        ray_comparison(args.workdir, data)
        return

    runs = interleaved_rounds(args, data)
    floor = {
        kind: min(runs["floor"], key=lambda run, kind=kind: run["seconds"][kind])
        for kind in ("offsets", "fast")
    }
    raw_tokens = runs["floor"][0]["tokens"]
    raw_rate = raw_tokens / floor["offsets"]["seconds"]["offsets"]
    fast_rate = raw_tokens / floor["fast"]["seconds"]["fast"]
    cold = min(runs["longdata"], key=lambda run: run["wall"])
    cold_build = min(runs["longdata"], key=lambda run: run["build_seconds"])
    trl = min(runs["trl"], key=lambda run: run["seconds"]) if runs["trl"] else None
    incremental = longdata_build(
        args.workdir,
        data,
        "base",
        cold=False,
        overrides=("sources[0].weight=1.5", f"packing.max_seq_len={MAX_SEQ_LEN // 2}"),
    )
    incremental["load"] = None
    assert incremental["cached"] == ["longalign"], "the token cache was not reused"
    for kind in ("offsets", "fast"):
        print(
            f"raw {kind} runs: "
            + ", ".join(f"{run['seconds'][kind]:.1f}s" for run in runs["floor"])
        )
    print(
        "longdata whole process runs: " + ", ".join(f"{r['wall']:.1f}s" for r in runs["longdata"])
    )
    if trl:
        print("TRL-style runs: " + ", ".join(f"{r['seconds']:.1f}s" for r in runs["trl"]))
    best = f"best of {args.rounds}"
    rows = [
        (
            f"raw tokenizers encode_batch ({best})",
            raw_tokens,
            floor["offsets"]["seconds"]["offsets"],
            None,
            None,
            floor["offsets"]["load"],
        ),
        (
            f"raw tokenizers encode_batch_fast, no offsets ({best})",
            raw_tokens,
            floor["fast"]["seconds"]["fast"],
            None,
            None,
            floor["fast"]["load"],
        ),
        (
            f"longdata build, cold (build() call, {best})",
            cold_build["tokens"],
            cold_build["build_seconds"],
            None,
            None,
            cold_build["load"],
        ),
        (
            f"longdata build, cold (whole process, {best})",
            cold["tokens"],
            cold["wall"],
            cold["rss"],
            None,
            cold["load"],
        ),
        (
            "longdata rebuild, new weight + max len",
            incremental["tokens"],
            incremental["wall"],
            incremental["rss"],
            cold["wall"] / incremental["wall"],
            None,
        ),
    ]
    if trl:
        rows.append(
            (
                f"TRL-style datasets.map + pack_dataset (num_proc={args.num_proc}, {best})",
                trl["tokens"],
                trl["seconds"],
                trl["rss"],
                None,
                trl["load"],
            )
        )
    if args.near_dedup:
        exact = longdata_build(args.workdir, data, "base", cold=False)
        near = longdata_build(
            args.workdir, data, "base", cold=False, overrides=("dedup.near.threshold=0.8",)
        )
        rows.append(
            (
                "longdata rebuild, exact dedup only",
                exact["tokens"],
                exact["wall"],
                exact["rss"],
                None,
                None,
            )
        )
        rows.append(
            (
                "longdata rebuild, + dedup.near (0.8, 128 perm, 5-gram)",
                near["tokens"],
                near["wall"],
                near["rss"],
                None,
                None,
            )
        )
    if args.scale:
        large = longdata_build(
            args.workdir, input_file(args.workdir, args.mb * args.scale), "large"
        )
        rows.append(
            (
                f"longdata build, cold, {args.scale:g}x input (whole process)",
                large["tokens"],
                large["wall"],
                large["rss"],
                None,
                None,
            )
        )
        rows.append(
            ("  ... build() call only", large["tokens"], large["build_seconds"], None, None, None)
        )

    print(
        f"\ninput {data.name}, tokenizer builtin:quickstart, max_seq_len {MAX_SEQ_LEN}, "
        f"load average now {os.getloadavg()[0]:.2f}"
    )
    print(
        f"| {'pipeline':<62} | {'tokens':>12} | {'seconds':>8} | {'M tok/s':>7} | {'% of raw':>8} "
        f"| {'peak RSS':>9} | {'note':>14} | {'load':>5} |"
    )
    print(
        f"|{'-' * 64}|{'-' * 14}:|{'-' * 9}:|{'-' * 8}:|{'-' * 9}:|{'-' * 10}:|{'-' * 15}:"
        f"|{'-' * 6}:|"
    )
    for label, tokens, seconds, rss, speedup, load in rows:
        rate = tokens / seconds
        note = f"{speedup:.1f}x faster" if speedup else ""
        memory = f"{rss / 2**20:,.0f} MiB" if rss else ""
        at = f"{load:.2f}" if load is not None else ""
        print(
            f"| {label:<62} | {tokens:>12,} | {seconds:>8.1f} | {rate / 1e6:>7.3f} | "
            f"{100 * rate / raw_rate:>7.0f}% | {memory:>9} | {note:>14} | {at:>5} |"
        )
    build_rate = cold_build["tokens"] / cold_build["build_seconds"]
    whole_rate = cold["tokens"] / cold["wall"]
    print(
        f"\nlongdata build() / raw encode_batch: {build_rate / raw_rate:.2f} (whole process "
        f"{whole_rate / raw_rate:.2f})"
    )
    print(
        f"longdata build() / raw encode_batch_fast: {build_rate / fast_rate:.2f} (whole process "
        f"{whole_rate / fast_rate:.2f}; target >= 0.85: "
        f"{'met' if whole_rate / fast_rate >= 0.85 else 'not met'})"
    )
    if trl:
        versus_trl = whole_rate / (trl["tokens"] / trl["seconds"])
        print(
            f"longdata (whole process) / TRL-style: {versus_trl:.2f}x (target >= 2x: "
            f"{'met' if versus_trl >= 2 else 'not met'})"
        )
    if args.scale:
        print(f"peak RSS {args.scale:g}x input / 1x input: {large['rss'] / cold['rss']:.2f}")
    print(
        f"stage seconds (cold, 1x, best whole-process run): "
        f"{json.dumps({k: round(v, 1) for k, v in cold['stages'].items()})}"
    )
    if args.near_dedup:
        extra = near["stages"]["mix"] - exact["stages"]["mix"]
        print(
            f"near-dedup: mix stage {near['stages']['mix']:.1f}s "
            f"vs {exact['stages']['mix']:.1f}s exact only "
            f"(+{extra:.1f}s, {near['tokens'] / max(extra, 1e-9) / 1e6:.1f} M tokens/s; "
            f"{100 * extra / cold['wall']:.0f}% of the cold build); near duplicates found: "
            f"{near['near_duplicates']}"
        )


if __name__ == "__main__":
    main()
