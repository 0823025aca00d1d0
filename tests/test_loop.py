"""The training loop: exact resume after a kill, LoRA, and loadable final checkpoints."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import AutoModelForCausalLM

from longdata.format import mark_ours
from longdata.trainer import collate
from longdata.trainer.checkpoint import STATE_FILE, Checkpointer, CheckpointError, checkpoint_dir
from longdata.trainer.config import ConfigError, resolve
from longdata.trainer.curriculum import Stage, plan_stages, share_steps
from longdata.trainer.data import Manifest
from longdata.trainer.distributed import ParallelContext
from longdata.trainer.flops import (
    FlopShape,
    device_peak_tflops,
    squared_sample_lengths,
    training_flops,
)
from longdata.trainer.loop import StepMetrics, TrainConfig, resolve_weights, train
from tests.builders import make_row, staged_build, two_bucket_build

VOCAB = 256


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return two_bucket_build(tmp_path_factory.mktemp("build"), VOCAB, (10, 40), 80)


def _config(build: Path, out: Path, **overrides: object) -> TrainConfig:
    settings = {
        "build_dir": str(build),
        "out_dir": str(out),
        "steps": 7,  # 16 rows / (2 rows x 2 micro-batches) = 4 steps per epoch: crosses one
        "batch_size": 2,
        "grad_accum": 2,
        "lr": 1e-2,
        "warmup_steps": 2,
        "save": "none",
        "progress": False,
        "attention": "sdpa_varlen",
    }
    return TrainConfig(**{**settings, **overrides})


class SimulatedKill(Exception):
    pass


def _kill_at(step: int):
    def on_step(metrics: StepMetrics) -> None:
        if metrics.step == step:
            raise SimulatedKill

    return on_step


@pytest.mark.parametrize("loss", ["token_mean", "sequence_mean"])
def test_resumed_run_matches_uninterrupted(build: Path, tmp_path: Path, loss: str) -> None:
    uninterrupted = train(_config(build, tmp_path / "full", loss=loss))
    killed = _config(build, tmp_path / "killed", loss=loss, checkpoint_every=2)
    # Killed after step 5 finished but before its checkpoint: step 5 is redone on resume.
    with pytest.raises(SimulatedKill):
        train(killed, on_step=_kill_at(5))
    killed.resume = killed.out_dir
    resumed = train(killed)

    expected = [m.loss for m in uninterrupted.metrics]
    assert [m.step for m in resumed.metrics] == [5, 6, 7]
    assert [m.loss for m in resumed.metrics] == expected[4:]
    assert all(np.isfinite(expected)) and expected[-1] < expected[0]
    logged = (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
    # The killed run logged steps 1-5; the resume cut step 5 (after the checkpoint) away.
    assert [json.loads(line)["step"] for line in logged] == list(range(1, 8))
    per_source = uninterrupted.metrics[0].loss_per_source
    assert set(per_source) <= {"alpha", "beta"} and per_source


def test_lora_with_trainable_embeddings_saves_loadable_checkpoints(
    build: Path, tmp_path: Path
) -> None:
    lora = {"lora": True, "train_embeddings_and_norms": True, "steps": 3, "lr": 5e-2}
    merged = train(_config(build, tmp_path / "merged", save="merged", **lora))
    adapter = train(_config(build, tmp_path / "adapter", save="adapter", **lora))

    from peft import PeftModel

    from longdata.trainer import load_model

    loaded = AutoModelForCausalLM.from_pretrained(merged.final_dir).eval()
    # LongLoRA-style: the norms trained too (they start at 1).
    assert not torch.allclose(loaded.model.norm.weight, torch.ones(128))
    base = load_model("tiny-llama", "sdpa_varlen", vocab_size=VOCAB, seed=0)
    with_adapter = PeftModel.from_pretrained(base, adapter.final_dir).eval()
    batch = collate([make_row([5, 7], np.random.default_rng(1), VOCAB)])
    with torch.no_grad():
        # Both runs trained identically (same seed), so merged weights == base + adapter.
        merged_logits = loaded(input_ids=batch["input_ids"][:, :5]).logits
        adapter_logits = with_adapter(**batch).logits[:, :5]
    assert torch.allclose(merged_logits, adapter_logits, atol=1e-5)


def test_auto_weights_are_bf16_only_for_lora_on_a_bf16_gpu(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_weights("auto", True, cuda) == "bf16"
    assert resolve_weights("auto", False, cuda) == "fp32"
    assert resolve_weights("auto", True, cpu) == "fp32"
    assert resolve_weights("fp8", True, cpu) == "fp8"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_weights("auto", True, cuda) == "fp32"


def test_fp8_weights_train_adapters_and_resume_exactly(build: Path, tmp_path: Path) -> None:
    fp8 = {"lora": True, "weights": "fp8", "save": "adapter", "steps": 4, "lr": 5e-2}
    uninterrupted = train(_config(build, tmp_path / "full", **fp8))
    killed = _config(build, tmp_path / "killed", checkpoint_every=2, **fp8)
    with pytest.raises(SimulatedKill):
        train(killed, on_step=_kill_at(3))
    # The checkpoint holds the adapters in their own dtype (fp32), never the fp8 base.
    saved = checkpoint_dir(tmp_path / "killed", 2) / STATE_FILE
    state = torch.load(saved, weights_only=True)
    assert state["model"] and all("lora_" in name for name in state["model"])
    assert {tensor.dtype for tensor in state["model"].values()} == {torch.float32}
    # lora_B starts at zero: nonzero after two steps means gradients reached the adapters.
    assert any(t.abs().max() > 0 for name, t in state["model"].items() if "lora_B" in name)
    killed.resume = killed.out_dir
    resumed = train(killed)
    expected = [m.loss for m in uninterrupted.metrics]
    assert [m.loss for m in resumed.metrics] == expected[2:]
    assert all(np.isfinite(expected))


# ---------------------------------------------------------------------------------------------
# Curriculum: a staged build's training splits in stage order


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Stages `short` (rows of 4 short samples) then `long` (2 long samples): stage order is
    not the sorted order of the split names, which is how manifest.json stores them."""
    rng = np.random.default_rng(3)

    def rows(count: int, samples: int, lengths: tuple[int, int]) -> list[dict]:
        return [
            make_row(rng.integers(*lengths, samples).tolist(), rng, VOCAB) for _ in range(count)
        ]

    return staged_build(
        tmp_path_factory.mktemp("staged"),
        {
            "short": (
                48,
                {
                    "train": {"le_0048": rows(8, 4, (2, 12))},
                    "validation": {"le_0048": rows(2, 4, (2, 12))},
                },
            ),
            "long": (
                80,
                {
                    "train": {"le_0080": rows(6, 2, (15, 40))},
                    "validation": {"le_0080": rows(2, 2, (15, 40))},
                },
            ),
        },
        VOCAB,
    )


def test_share_steps_by_hand() -> None:
    assert share_steps([1, 3], 8) == [2, 6]
    assert share_steps([1, 1, 1], 10) == [4, 3, 3]  # the remainder to the first
    assert share_steps([1, 1000], 3) == [1, 2]  # every stage with tokens trains
    assert share_steps([0, 5], 4) == [0, 4]
    with pytest.raises(ConfigError, match="fewer than the 2 curriculum stages"):
        share_steps([1, 1], 1)


def test_curriculum_trains_stages_in_order_with_token_shares(staged: Path, tmp_path: Path) -> None:
    manifest = Manifest.read(staged)
    stored = json.loads((staged / "manifest.json").read_text())
    assert list(stored["splits"])[0] == "long/train"  # stored sorted
    assert manifest.training_splits() == ["short/train", "long/train"]
    tokens = [
        sum(s.tokens for s in manifest.split(name).streams) for name in manifest.training_splits()
    ]
    config = _config(staged, tmp_path / "run", steps=6, batch_size=1, grad_accum=1)
    stages = plan_stages(manifest, config)
    assert [(s.split, s.steps) for s in stages] == list(
        zip(["short/train", "long/train"], share_steps(tokens, 6), strict=True)
    )
    assert stages[0].steps != stages[1].steps  # the share follows tokens, not an even split

    result = train(config)
    expected = [split for stage in stages for split in [stage.split] * stage.steps]
    assert [m.split for m in result.metrics] == expected
    assert max(m.tokens for m in result.metrics[: stages[0].steps]) <= 48
    assert min(m.tokens for m in result.metrics[stages[0].steps :]) > 48
    lrs = [m.lr for m in result.metrics]  # one warmup + cosine over all stages, no restart
    assert lrs[:3] == pytest.approx([5e-3, 1e-2, 1e-2])
    assert all(later < earlier for earlier, later in zip(lrs[2:], lrs[3:]))


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "final" / "model.safetensors")


@pytest.mark.parametrize(("checkpoint_every", "killed_after"), [(2, 3), (3, 4), (4, 5)])
def test_resume_across_a_stage_boundary_is_exact(
    staged: Path, tmp_path: Path, checkpoint_every: int, killed_after: int
) -> None:
    """stage_steps 3 + 4. Resumed from step 2: trains through the boundary; from step 3 (the
    boundary itself, killed just after it): starts stage 2 afresh; from step 4: restores stage
    2's dataloader position."""
    settings = {"stage_steps": [3, 4], "steps": 7, "save": "merged", "eval_every": 4}
    uninterrupted = train(_config(staged, tmp_path / "full", **settings))
    killed = _config(staged, tmp_path / "killed", checkpoint_every=checkpoint_every, **settings)
    with pytest.raises(SimulatedKill):
        train(killed, on_step=_kill_at(killed_after))
    killed.resume = str(tmp_path / "killed")
    resumed = train(killed)

    first_resumed = checkpoint_every + 1
    assert [m.step for m in resumed.metrics] == list(range(first_resumed, 8))
    for got, want in zip(resumed.metrics, uninterrupted.metrics[first_resumed - 1 :], strict=True):
        assert (got.split, got.loss, got.grad_norm, got.validation) == (
            want.split,
            want.loss,
            want.grad_norm,
            want.validation,
        )
    full, again = _final_weights(tmp_path / "full"), _final_weights(tmp_path / "killed")
    assert all(torch.equal(full[name], again[name]) for name in full)
    logged = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").open()]
    assert [line["step"] for line in logged] == list(range(1, 8))


def test_eval_every_logs_the_stage_validation_loss_and_changes_no_step(
    staged: Path, tmp_path: Path
) -> None:
    settings = {"stage_steps": [2, 3], "steps": 5, "batch_size": 1, "grad_accum": 1}
    plain = train(_config(staged, tmp_path / "plain", **settings))
    evaluated = train(_config(staged, tmp_path / "eval", eval_every=2, **settings))

    assert [m.loss for m in evaluated.metrics] == [m.loss for m in plain.metrics]
    logged = {
        line["step"]: line.get("validation")
        for line in map(json.loads, (tmp_path / "eval" / "metrics.jsonl").open())
    }
    assert [step for step, v in logged.items() if v] == [2, 4]
    assert logged[2]["split"] == "short/validation" and logged[4]["split"] == "long/validation"
    # The long validation rows are two samples of >= 15 tokens each, about 70% targets.
    assert logged[4]["target_tokens"] > 2 * 2 * 8 and np.isfinite(logged[4]["token_mean"])
    assert logged[4]["token_mean"] == evaluated.metrics[3].validation["token_mean"]


def test_a_missing_split_is_one_line_listing_the_builds_splits(
    staged: Path, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from longdata.cli import app

    result = CliRunner().invoke(
        app, ["train", str(staged), "--split", "train", "--out", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1
    for split in ("long/train", "long/validation", "short/train", "short/validation"):
        assert split in result.stderr


# ---------------------------------------------------------------------------------------------
# Checkpoints: plain data only, pruned by name, never unpickled


class _Planted:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_planted_pickle_is_refused_and_never_runs(build: Path, tmp_path: Path) -> None:
    import pickle

    run = tmp_path / "run"
    config = _config(build, run, steps=2, checkpoint_every=1)
    train(config)
    checkpoint = run / "checkpoints" / "step_0000002"
    marker = tmp_path / "the_pickle_ran"
    (checkpoint / "state.pt").write_bytes(pickle.dumps({"model": _Planted(marker)}))
    # The old single-file layout, planted beside it: never even considered.
    (run / "checkpoints" / "step_0000003.pt").write_bytes(pickle.dumps(_Planted(marker)))

    config.resume = str(run)
    with pytest.raises(CheckpointError, match="refused") as refused:
        train(config)
    assert "\n" not in str(refused.value)
    assert not marker.exists()

    from typer.testing import CliRunner

    from longdata.cli import app

    cli = CliRunner().invoke(
        app, ["train", str(build), "--out", str(run), "--resume", str(checkpoint)]
    )
    assert cli.exit_code == 2 and cli.stderr.count("\n") == 1 and "refused" in cli.stderr
    assert not marker.exists()


def test_checkpoints_hold_only_tensors_and_plain_data(build: Path, tmp_path: Path) -> None:
    config = _config(build, tmp_path / "run", steps=1, checkpoint_every=1)
    train(config)
    assert resolve(tmp_path / "run" / "config.json") == config  # the run's config, saved
    checkpoint = tmp_path / "run" / "checkpoints" / "step_0000001"
    state = torch.load(checkpoint / "state.pt", weights_only=True)
    assert set(state) == {"model", "optimizer", "scheduler", "rng"}
    meta = json.loads((checkpoint / "meta.json").read_text())
    assert (
        meta["step"] == 1
        and meta["split"] == "train"
        and meta["dataloader"]["samples_in_epoch"] == 4
    )


def test_keep_checkpoints_prunes_only_its_own(build: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    foreign = [run / "checkpoints" / "step_9999999", run / "checkpoints" / "best"]
    for path in foreign:
        path.mkdir(parents=True)
        (path / "weights.bin").write_text("not ours")
    mark_ours(run, "run")  # a run directory (else --out over it is refused) holding foreign files
    train(_config(build, run, steps=5, checkpoint_every=1, keep_checkpoints=2))
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert kept == ["best", "step_0000004", "step_0000005", "step_9999999"]
    assert all((path / "weights.bin").read_text() == "not ours" for path in foreign)


class _Data:
    """The split and loader position a checkpoint records, as the loop's stream gives them."""

    split = "train"
    samples = 0

    def position(self) -> dict[str, int]:
        return {"samples_in_epoch": self.samples}


def _trainable() -> tuple[torch.nn.Module, torch.optim.Optimizer, LambdaLR]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    return model, optimizer, LambdaLR(optimizer, lambda step: 1 / (step + 1))


def test_the_checkpointer_owns_cadence_pruning_and_the_resume_lookup(tmp_path: Path) -> None:
    run = tmp_path / "run"
    config = TrainConfig(build_dir="b", out_dir=str(run), checkpoint_every=2, keep_checkpoints=2)
    context = ParallelContext(device=torch.device("cpu"))
    checkpointer = Checkpointer(config, context)
    model, optimizer, scheduler = _trainable()
    assert checkpointer.restore(model, optimizer, scheduler) == 0
    data, saved, weights = _Data(), [], {}
    for step in range(1, 8):
        model(torch.ones(1, 3)).sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        data.samples = 4 * step
        saved.append(checkpointer.save_if_due(step, data))
        weights[step] = model.weight.detach().clone()
    assert [path.name if path else None for path in saved] == [
        None, "step_0000002", None, "step_0000004", None, "step_0000006", None
    ]  # fmt: skip
    assert sorted(path.name for path in (run / "checkpoints").iterdir()) == [
        "step_0000004",
        "step_0000006",
    ]

    resumed = Checkpointer(dataclasses.replace(config, resume=str(run)), context)
    model, optimizer, scheduler = _trainable()
    assert resumed.restore(model, optimizer, scheduler) == 6
    assert torch.equal(model.weight, weights[6]) and scheduler.last_epoch == 6
    assert resumed.loader_position(Stage("train", 1, 9)) == {"samples_in_epoch": 24}
    assert resumed.loader_position(Stage("train", 7, 9)) is None  # a later stage starts afresh
    with pytest.raises(CheckpointError, match="was training split train at step 6"):
        resumed.loader_position(Stage("ctx16k/train", 5, 9))


def test_resume_of_a_path_without_checkpoints_is_one_line(build: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="neither a checkpoint directory"):
        train(_config(build, tmp_path / "run", resume=str(tmp_path)))


# ---------------------------------------------------------------------------------------------
# Metrics: FLOPs, MFU, TensorBoard, W&B


def test_training_flops_by_hand() -> None:
    shape = FlopShape(body_params=1000, head_params=100, layers=2, attention_width=8)
    # Samples of 3 and 5 tokens packed in one row of 8, 4 targets:
    # forward = 2*1000*8 + 2*100*4 + 4*2*8*(3^2 + 5^2) = 16000 + 800 + 2176.
    assert training_flops(shape, 8, 4, 3**2 + 5**2) == 3 * 18976
    batch = collate([make_row([3, 5], np.random.default_rng(0), VOCAB)], pad_to_multiple_of=16)
    assert squared_sample_lengths(batch) == 34  # not 8^2 (one row) nor 16^2 (padded)


def test_flop_shape_of_tiny_llama() -> None:
    from longdata.trainer import load_model

    shape = FlopShape.of(load_model("tiny-llama", "sdpa_varlen", vocab_size=VOCAB, seed=0))
    hidden, inter, head_dim = 128, 384, 32
    attention = hidden * 4 * head_dim * 2 + hidden * 2 * head_dim * 2  # q, o; k, v (2 kv heads)
    assert shape == FlopShape(2 * (attention + 3 * hidden * inter), VOCAB * hidden, 2, 128)


def test_step_metrics_carry_flops_and_mfu_against_a_given_peak(build: Path, tmp_path: Path) -> None:
    cpu = train(_config(build, tmp_path / "cpu", steps=1))
    assert cpu.metrics[0].mfu is None  # no known peak on a CPU
    given = train(_config(build, tmp_path / "given", steps=1, peak_tflops=0.5))
    metrics = given.metrics[0]
    assert metrics.model_flops == cpu.metrics[0].model_flops > 0
    assert metrics.mfu == pytest.approx(metrics.model_flops / metrics.elapsed_s / 0.5e12)


def test_peak_flops_known_for_bf16_on_named_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = torch.device("cuda")
    for name, peak in (
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA GeForce GTX 1080", None),
    ):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert device_peak_tflops(cuda, bf16=True) == peak
    assert device_peak_tflops(cuda, bf16=False) is None  # fp32 peaks are not tabled
    assert device_peak_tflops(torch.device("cpu"), bf16=True) is None


def test_tensorboard_gets_the_step_scalars(build: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = train(_config(build, tmp_path / "run", steps=2, report_to=["tensorboard"]))
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    losses = [(e.step, e.value) for e in events.Scalars("loss")]
    assert losses == [(m.step, pytest.approx(m.loss)) for m in result.metrics]
    assert "loss_per_source/alpha" in events.Tags()["scalars"]


def test_wandb_offline_run_gets_the_step_scalars(
    build: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    logged: list[tuple[int, dict]] = []
    real_init = wandb.init

    def init(**kwargs):  # the real run, with its log calls recorded on the way through
        run = real_init(**kwargs)
        real_log = run.log
        monkeypatch.setattr(
            run, "log", lambda data, step: (logged.append((step, data)), real_log(data, step=step))
        )
        return run

    monkeypatch.setattr(wandb, "init", init)
    result = train(_config(build, tmp_path / "run", steps=2, report_to=["wandb"]))
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert [(step, data["loss"]) for step, data in logged] == [
        (m.step, pytest.approx(m.loss)) for m in result.metrics
    ]
    assert all("loss_per_source/alpha" in data for _, data in logged)


def test_metrics_are_cut_back_to_the_resumed_step(tmp_path: Path) -> None:
    from longdata.trainer.reporting import keep_steps_up_to

    metrics = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": step, "loss": 1.0}) for step in (1, 2, 3, 4)]
    metrics.write_text("\n".join(lines) + '\n{"step": 5, "lo')  # killed mid-line
    keep_steps_up_to(metrics, 2)
    assert metrics.read_text() == "\n".join(lines[:2]) + "\n"
    keep_steps_up_to(metrics, 0)  # a fresh run into the same directory starts a new log
    assert metrics.read_text() == ""


def test_position_span_reaches_the_training_batches(
    build: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--position-span gives the training batches PoSE positions, seeded by the run's seed
    (the validation loss collates its own batches, with contiguous positions)."""
    import longdata.trainer.data as data

    spans = []
    real_collate = data.collate

    def recording_collate(rows, **options):
        batch = real_collate(rows, **options)
        spans.append((options.get("position_span"), options.get("position_seed")))
        return batch

    monkeypatch.setattr(data, "collate", recording_collate)
    train(_config(build, tmp_path / "run", steps=2, position_span=512, seed=3))
    assert spans and set(spans) == {(512, 3)}
