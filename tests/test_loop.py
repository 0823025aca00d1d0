"""The training loop: exact resume after a kill, LoRA, and loadable final checkpoints."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.builders import make_row, two_bucket_build
from trainer import collate
from trainer.loop import StepMetrics, TrainConfig, train

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

    from trainer import load_model

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
