"""benchmarks/learn_niah.py: its recipe is valid and its no-mask ablation really crosses samples."""

from __future__ import annotations

import importlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from longdata.trainer import collate, load_model
from longdata.trainer import model as model_module
from tests.builders import make_row


def _script():
    return importlib.import_module("benchmarks.learn_niah")


def test_the_phase_recipes_are_valid_and_share_no_task(tmp_path: Path) -> None:
    from longdata.recipe import load_recipe

    learn_niah = _script()
    settings = learn_niah.Settings(out=str(tmp_path / "run"))
    loaded = {}
    for phase, recipe in learn_niah.recipes(settings).items():
        path = tmp_path / f"{phase}.yml"
        path.write_text(yaml.safe_dump(recipe))
        loaded[phase] = load_recipe(path)
    assert list(loaded) == list(learn_niah.PHASES) == ["short", "long"]
    short, long = loaded["short"], loaded["long"]
    assert [s.count for s in short.sources] == [settings.short_items]
    assert [s.count for s in long.sources] == [settings.items]
    assert short.sources[0].length_range == settings.short_lengths
    assert long.sources[0].length_range == settings.trained_lengths
    for recipe in loaded.values():
        assert all(s.tasks == ("needle",) and s.needles == (1, 1) for s in recipe.sources)
        assert recipe.packing.max_seq_len == settings.row_tokens
    # Distinct seeds: no task of one phase reappears in the other.
    assert short.sources[0].seed != long.sources[0].seed
    assert short.output.dir != long.output.dir


def test_without_masks_later_samples_see_earlier_ones() -> None:
    learn_niah = _script()
    rng = np.random.default_rng(0)
    rows = [make_row([12, 20], rng, 512), make_row([8, 8, 16], rng, 512)]
    masked = collate(rows)
    crossed = learn_niah.attend_across_samples(masked)
    assert torch.equal(crossed["labels"], masked["labels"])
    assert crossed["position_ids"][0].tolist() == list(range(32))
    assert crossed["cu_seqlens"].tolist() == [0, 32, 64]
    model = load_model("tiny-llama", "sdpa_varlen", vocab_size=512, seed=0).eval()
    inputs = {k: v for k, v in masked.items() if k != "labels"}
    with torch.no_grad():
        apart = model(**inputs).logits
        together = model(**{k: v for k, v in crossed.items() if k != "labels"}).logits
    # The first sample of a row is the same either way; the ones after it are not.
    assert torch.allclose(apart[0, :12], together[0, :12], atol=1e-5)
    assert not torch.allclose(apart[0, 12:], together[0, 12:], atol=1e-3)
    assert not torch.allclose(apart[1, 8:], together[1, 8:], atol=1e-3)


def test_a_tiny_experiment_runs_both_phases_and_reports(tmp_path: Path) -> None:
    learn_niah = _script()
    settings = learn_niah.Settings(
        out=str(tmp_path / "run"),
        short_items=60,
        items=6,
        short_cycles=(2, 1),
        long_steps=2,
        eval_lengths=(512,),
        longer_length=1024,
        samples_per_cell=1,
        ablations=False,
        jobs=1,
        threads=1,
    )
    results = learn_niah.experiment(settings)
    (main,) = results["runs"]
    assert list(main["phases"]) == ["short", "long"]
    assert main["steps"] == 5 and "eval" in main["phases"]["short"]
    assert main["phases"]["short"]["cycles"] == [2, 1]
    out = tmp_path / "run"
    for report in ("init", "main/after_short", "main/after", "main/longer"):
        assert (out / report / "heatmap.png").is_file(), report

    # Each cycle and phase trained from the one before's checkpoint, not from a fresh init.
    def config(name):
        return json.loads((out / "main" / name / "config.json").read_text())

    assert config("short-1")["model"] == learn_niah.PRESET
    assert config("short-2")["model"] == str(out / "main" / "short-1" / "final")
    assert config("long")["model"] == str(out / "main" / "short-2" / "final")
    # A warm restart: the second cycle has its own full schedule.
    assert config("short-2")["steps"] == 1 and config("short-2")["lr"] == settings.short_lr
    summary = (out / "summary.md").read_text()
    assert "main, after the short phase | 3 + 0" in summary and "| main | 3 + 2 |" in summary
    assert main["needles"] == 1 and results["before"]["needles"] == 1

    # --evaluate-only: the same checkpoints scored on another grid, nothing retrained.
    trained_at = (out / "main" / "long" / "final").stat().st_mtime_ns
    again = learn_niah.experiment(replace(settings, samples_per_cell=2), evaluate_only=True)
    (rescored,) = again["runs"]
    assert rescored["needles"] == 2 and rescored["longer"]["needles"] == 2
    assert rescored["phases"]["short"]["eval"]["prompts"] == 2 * len(learn_niah.DEPTHS)
    assert rescored["train_seconds"] == main["train_seconds"]
    assert (out / "main" / "long" / "final").stat().st_mtime_ns == trained_at
    assert json.loads((out / "main" / "after" / "results.json").read_text())["needles"][1]
    assert "--evaluate-only" in (out / "summary.md").read_text()
    # A different training setting is refused, naming it.
    with pytest.raises(SystemExit, match="long_steps"):
        learn_niah.experiment(replace(settings, long_steps=3), evaluate_only=True)


def test_a_tiny_learn_ruler_experiment_trains_the_stages_and_reports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    learn_ruler = importlib.import_module("benchmarks.learn_ruler")
    Run, Stage = learn_ruler.Run, learn_ruler.Stage
    stages = (
        Stage("base", 8, (80, 120), (1,), 1e-3, data="repeats", min_lr_ratio=1.0),
        Stage("base-codes", 8, (80, 120), (1,), 1e-3, "repeats", 0.5, min_lr_ratio=1.0),
        Stage("short", 40, (200, 400), (1, 1), 1e-3),
        Stage("long", 6, (600, 900), (1,), 1e-3),
    )
    curriculum = ("base", "base-codes", "short", "long")
    runs = (
        Run("needle_only", learn_ruler.NEEDLES, curriculum),
        Run("main", learn_ruler.MIX, curriculum, parent="needle_only", after="base-codes"),
        Run("main_pose", learn_ruler.MIX, curriculum, "main", "short", position_span=2_048),
    )
    settings = learn_ruler.Settings(
        out=str(tmp_path / "run"),
        stages=stages,
        runs=runs,
        eval_lengths=(640,),
        samples=1,
        max_new_tokens=4,
        threads=1,
    )
    # main starts from the shared base stages, which the ablation trains: not there yet.
    with pytest.raises(SystemExit, match="run --runs needle_only first"):
        learn_ruler.experiment(replace(settings, train=("main",)))
    # The runs in separate invocations: the summary gathers them.
    alone = learn_ruler.experiment(replace(settings, train=("needle_only",)))
    assert [run["run"] for run in alone["runs"]] == ["needle_only"]
    learn_ruler.experiment(replace(settings, train=("main",)))
    results = learn_ruler.experiment(replace(settings, train=("main_pose",)))
    assert [run["run"] for run in results["runs"]] == ["needle_only", "main", "main_pose"]
    out = tmp_path / "run"
    for run, definition in zip(results["runs"], runs):
        assert [s["stage"] for s in run["stages"]] == list(definition.stages)
        assert set(run["ruler"]) == set(learn_ruler.ruler.TASKS)
        assert (out / run["run"] / "ruler" / "results.json").is_file()
        assert (out / run["run"] / "niah" / "heatmap.png").is_file()
    assert [s.get("trained_by") for s in results["runs"][2]["stages"]] == [
        "needle_only",
        "needle_only",
        "main",
        None,
    ]
    # The base stages train on raw text: each document a block of 8-32 elements written again
    # and again, codes and names only where the stage mixes them in.
    for stage, has_codes in (("base", False), ("base-codes", True)):
        recipe = yaml.safe_load((out / "needle_only" / f"recipe-{stage}.yml").read_text())
        assert [source["kind"] for source in recipe["sources"]] == ["text"]
        lines = Path(recipe["sources"][0]["path"]).read_text().splitlines()
        assert len(lines) == 8
        documents = [json.loads(line)["text"] for line in lines]
        for document in documents:
            elements = document.split()
            assert 80 <= len(elements) <= 120
            assert any(
                all(elements[i] == elements[i - period] for i in range(period, len(elements)))
                for period in range(8, 33)
            )
        every_element = " ".join(documents).split()
        assert any(not e.islower() for e in every_element) == has_codes
    # The ablation's recipes hold needle tasks only; the main run's every family, in its shares.
    main_recipe = yaml.safe_load((out / "main" / "recipe-long.yml").read_text())
    ablation = yaml.safe_load((out / "needle_only" / "recipe-long.yml").read_text())
    main_tasks = {task for source in main_recipe["sources"] for task in source["tasks"]}
    assert main_tasks == {"needle", *learn_ruler.ruler.TASKS}
    shares = [source["count"] / stages[3].items for source in main_recipe["sources"]]
    assert shares == pytest.approx([share for _, share in learn_ruler.MIX], abs=0.1)
    assert [source["tasks"] for source in ablation["sources"]] == [["needle"]]
    assert ablation["sources"][0]["count"] == stages[3].items

    # Each cycle and stage trained from the one before's checkpoint; a child's first own stage
    # from its parent's checkpoint after the stage it inherits, which it does not train again.
    def config_of(run: str, directory: str) -> dict:
        return json.loads((out / run / directory / "config.json").read_text())

    assert config_of("needle_only", "base-codes")["model"] == str(
        out / "needle_only" / "base" / "final"
    )
    assert config_of("needle_only", "short-1")["model"] == str(
        out / "needle_only" / "base-codes" / "final"
    )
    assert config_of("needle_only", "short-2")["model"] == str(
        out / "needle_only" / "short-1" / "final"
    )
    assert config_of("needle_only", "base")["min_lr_ratio"] == 1.0
    assert (
        config_of("needle_only", "short-1")["min_lr_ratio"]
        == learn_ruler.loop.TrainConfig.min_lr_ratio
    )
    assert config_of("main", "short-1")["model"] == str(
        out / "needle_only" / "base-codes" / "final"
    )
    assert config_of("main", "long")["model"] == str(out / "main" / "short-2" / "final")
    assert config_of("main_pose", "long")["model"] == str(out / "main" / "short-2" / "final")
    assert not (out / "main" / "base").exists() and not (out / "main_pose" / "short-1").exists()
    # PoSE positions in main_pose's own stage only.
    assert config_of("main_pose", "long")["position_span"] == 2_048
    assert config_of("main", "long")["position_span"] is None
    # Accuracy for NIAH and every ruler task, then the ruler tasks' recall, each run in turn.
    accuracy, recall = (out / "summary.md").read_text().split("Recall (RULER's metric):")
    tasks = learn_ruler.ruler.TASKS
    assert accuracy.count("| main | ") == 1 + len(tasks) and recall.count("| main | ") == len(tasks)
    vartrack = results["runs"][1]["ruler"]["vartrack"]
    assert f"| main | vartrack | {vartrack['recall_by_length']['640']:.3f} |" in recall
    # Re-running keeps every stage cycle trained with the same config on the same build from the
    # same weights; a stage whose build changed (one more item) is trained again, and the ones
    # after it (their starting weights changed).
    trained: list[str] = []
    real_train = learn_ruler.loop.train

    def recording_train(config):
        trained.append(Path(config.out_dir).name)
        return real_train(config)

    monkeypatch.setattr(learn_ruler.loop, "train", recording_train)
    again = learn_ruler.experiment(replace(settings, train=("needle_only",)))
    assert trained == []
    assert again["runs"][0]["stages"] == results["runs"][0]["stages"]
    longer = (replace(stages[0], items=stages[0].items + 1), *stages[1:])
    learn_ruler.experiment(replace(settings, stages=longer, train=("needle_only",)))
    assert trained == ["base", "base-codes", "short-1", "short-2", "long"]
    # So is every stage when the preset's config changes: the weights depend on it, not on the
    # preset's name.
    trained.clear()
    preset = learn_ruler.PRESET
    original = model_module.PRESETS[preset]

    def rescaled(vocab_size: int):
        config = original(vocab_size)
        config.initializer_range *= 2
        return config

    monkeypatch.setitem(model_module.PRESETS, preset, rescaled)
    learn_ruler.experiment(replace(settings, stages=longer, train=("needle_only",)))
    assert trained == ["base", "base-codes", "short-1", "short-2", "long"]
    # A run made with other settings is not gathered into this table.
    other = learn_ruler.experiment(replace(settings, samples=2, train=()))
    assert other["runs"] == []
    # Nor a run whose definition changed.
    remixed = (runs[0], replace(runs[1], mix=learn_ruler.NEEDLES), runs[2])
    gathered = learn_ruler.experiment(replace(settings, runs=remixed, train=()))
    assert [run["run"] for run in gathered["runs"]] == ["main_pose"]
    # S2-Attn vs full (benchmarks/s2_niah.py): the long stage again from the same start, with
    # only the pattern changed; both evaluated with full attention.
    s2_niah = importlib.import_module("benchmarks.s2_niah")
    arguments = ["--from", str(out), "--out", str(tmp_path / "s2"), "--stage", "long"]
    summary = s2_niah.main([*arguments, "--samples", "1", "--lengths", "640"])
    assert [r["trained_with"] for r in summary["runs"]] == ["full", "shifted_sparse"]
    s2_config = json.loads((tmp_path / "s2" / "shifted_sparse" / "config.json").read_text())
    reference = out / "main" / "long" / "config.json"
    full_config = json.loads(reference.read_text())
    different = {key for key in s2_config if s2_config[key] != full_config[key]}
    assert different == {"attention_pattern", "out_dir"}
    assert s2_config["attention_pattern"] == "shifted_sparse"
    assert (tmp_path / "s2" / "shifted_sparse" / "niah" / "results.json").is_file()
    reference.write_text(json.dumps({**full_config, "attention_pattern": "shifted_sparse"}))
    with pytest.raises(SystemExit, match="full attention"):
        s2_niah.main([*arguments[:3], str(tmp_path / "s2-again"), "--stage", "long"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"stages": ("base", "typo")}, "stage 'typo' is not in"),
        ({"parent": "later"}, "parent 'later' is not defined before it"),
        ({"after": "typo"}, "'typo' is not a stage of it and its parent"),
        ({"stages": ("base-codes", "base", "short")}, "its stages up to 'base-codes' differ"),
    ],
)
def test_learn_ruler_refuses_a_run_it_cannot_train_in_one_line(change, message) -> None:
    learn_ruler = importlib.import_module("benchmarks.learn_ruler")
    settings = learn_ruler.Settings()
    learn_ruler.check_runs(settings)  # the shipped definitions are trainable
    broken = replace(settings.runs[1], **change)
    runs = (settings.runs[0], broken, *settings.runs[2:])
    with pytest.raises(SystemExit, match=message):
        learn_ruler.check_runs(replace(settings, runs=runs))


def test_learn_ruler_word_blocks_are_a_token_an_element() -> None:
    """The base stage's lengths are in tokens: a block of words is one token a word (the
    document's first word, with no space before it, may take two)."""
    import random

    from longdata.recipe import TokenizerConfig
    from longdata.stages.templates import load_tokenizer

    learn_ruler = importlib.import_module("benchmarks.learn_ruler")
    words = learn_ruler.one_token_words(64, seed=0)
    assert len(set(words)) == 64 and words == learn_ruler.one_token_words(64, seed=0)
    config = TokenizerConfig(name=learn_ruler.TOKENIZER)
    tokenizer, _ = load_tokenizer(config, require_chat_template=False)
    rng = random.Random(0)
    for elements in (96, 128, 160):
        document = learn_ruler.repeated_block(rng, elements, words, code_share=0.0)
        tokens = tokenizer.encode(document, add_special_tokens=False)
        assert elements <= len(tokens) <= elements + 1
