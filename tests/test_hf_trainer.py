"""Training on a build with stock transformers: `trainer.hf` and
examples/train_with_hf_trainer.py."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig

from longdata.trainer.hf import BuildRows, PackedCollator, packed_batch, prepare_for_packed_batches
from tests.builders import make_row, use_quickstart_tokenizer, write_build

VOCAB = 300
SEQ_LENS = ([5, 9, 3], [12], [1, 7])  # a one-token sample, too: its boundary must still count


def _rows() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [make_row(lens, rng, VOCAB) for lens in SEQ_LENS]


def _stock_llama(attn_implementation: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)


def _samples(rows):
    """(input_ids, loss_mask) of every sample, in order."""
    for row in rows:
        start = 0
        for length in row["seq_lens"]:
            end = start + int(length)
            yield row["input_ids"][start:end].astype(np.int64), row["loss_mask"][start:end]
            start = end


def test_packed_batch_layout() -> None:
    rows = _rows()
    batch = PackedCollator()(rows)
    total = sum(sum(lens) for lens in SEQ_LENS)
    assert batch["input_ids"].shape == batch["labels"].shape == (1, total)
    assert batch["position_ids"].shape == (1, total)
    flat_ids = np.concatenate([r["input_ids"] for r in rows]).astype(np.int64)
    assert batch["input_ids"][0].tolist() == flat_ids.tolist()
    positions, labels, boundaries = [], [], [0]
    for ids, mask in _samples(rows):
        positions += list(range(len(ids)))
        labels += [-100] + [int(t) if m else -100 for t, m in zip(ids[1:], mask[1:])]
        boundaries.append(boundaries[-1] + len(ids))
    assert batch["position_ids"][0].tolist() == positions
    assert batch["labels"][0].tolist() == labels
    for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
        assert batch[key].dtype == torch.int32 and batch[key].tolist() == boundaries
    assert batch["max_length_q"] == batch["max_length_k"] == 12
    assert set(batch) == {
        "input_ids",
        "labels",
        "position_ids",
        "cu_seq_lens_q",
        "cu_seq_lens_k",
        "max_length_q",
        "max_length_k",
    }


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_logits_and_loss_equal_each_sample_alone(attn_implementation: str) -> None:
    """Stock transformers (sdpa / eager, no cache) keeps the collator's samples apart."""
    rows = _rows()
    model = prepare_for_packed_batches(_stock_llama(attn_implementation)).eval()
    batch = packed_batch(rows)
    with torch.no_grad():
        packed = model(**batch)
        alone = [
            model(input_ids=torch.from_numpy(ids)[None]).logits[0] for ids, _ in _samples(rows)
        ]
    assert float((packed.logits[0] - torch.cat(alone)).abs().max()) < 1e-4
    # The model's own loss is the token mean over the labelled tokens of every sample alone.
    losses = []
    for (ids, mask), logits in zip(_samples(rows), alone):
        targets = [t for t in range(1, len(ids)) if mask[t]]
        losses += [F.cross_entropy(logits[t - 1], torch.tensor(ids[t])) for t in targets]
    assert float(packed.loss) == pytest.approx(float(torch.stack(losses).mean()), abs=1e-5)


def test_with_a_kv_cache_the_samples_attend_to_each_other() -> None:
    """Why `prepare_for_packed_batches` turns the cache off: with it, transformers 4.57 ignores
    the boundaries in position_ids under sdpa."""
    rows = _rows()
    model = _stock_llama("sdpa").eval()
    assert model.config.use_cache
    batch = packed_batch(rows)
    with torch.no_grad():
        packed = model(**batch).logits[0]
        alone = torch.cat(
            [model(input_ids=torch.from_numpy(ids)[None]).logits[0] for ids, _ in _samples(rows)]
        )
    assert float((packed - alone).abs().max()) > 1e-2


def test_prepare_refuses_an_attention_that_ignores_the_boundaries() -> None:
    model = _stock_llama("sdpa")
    model.config._attn_implementation = "something_else"
    with pytest.raises(ValueError, match="not known to keep packed samples apart"):
        prepare_for_packed_batches(model)


@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None,
    reason="flash_attention_2 needs a CUDA GPU and the flash-attn package",
)
def test_flash_attention_2_reads_the_cu_seq_lens() -> None:
    rows = _rows()
    model = _stock_llama("flash_attention_2").to("cuda", torch.bfloat16).eval()
    prepare_for_packed_batches(model)
    batch = {
        k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in packed_batch(rows).items()
    }
    with torch.no_grad():
        packed = model(**batch).logits[0].float()
        alone = torch.cat(
            [
                model(input_ids=torch.from_numpy(ids)[None].cuda()).logits[0].float()
                for ids, _ in _samples(rows)
            ]
        )
    assert float((packed - alone).abs().max()) < 5e-2  # bf16 kernels


def _build(tmp_path: Path) -> tuple[Path, list[dict[str, np.ndarray]]]:
    rng = np.random.default_rng(3)
    short = [make_row([20, 30, 14], rng, VOCAB), make_row([64], rng, VOCAB)]
    long = [
        make_row([100, 28], rng, VOCAB),
        make_row([60, 60, 8], rng, VOCAB),
        make_row([128], rng, VOCAB),
    ]
    return write_build(tmp_path / "build", {"le_0064": short, "le_0128": long}, VOCAB, 128), [
        *short,
        *long,
    ]


def _key(row) -> tuple[int, ...]:
    return tuple(int(t) for t in row["input_ids"])


def test_build_rows_reads_every_row_once(tmp_path: Path) -> None:
    build, written = _build(tmp_path)
    rows = BuildRows(build, "train")
    assert len(rows) == 5
    assert [_key(r) for r in rows] == [_key(r) for r in written]
    shuffled = BuildRows(build, "train", shuffle=True, seed=1)
    first = [_key(r) for r in shuffled]
    assert sorted(first) == sorted(_key(r) for r in written)
    assert [_key(r) for r in shuffled] == first  # the same epoch, the same order
    orders = set()
    for epoch in range(6):
        shuffled.set_epoch(epoch)
        orders.add(tuple(_key(r) for r in shuffled))
    assert len(orders) > 1
    with pytest.raises(KeyError):
        BuildRows(build, "validation")


def test_example_trains_with_the_stock_trainer(tmp_path: Path) -> None:
    import importlib

    build, _ = _build(tmp_path)
    example = importlib.import_module("examples.train_with_hf_trainer")
    out = tmp_path / "run"
    trainer = example.main([str(build), "--max-steps", "3", "--lr", "1e-3", "--out", str(out)])
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert trainer.state.global_step == 3
    assert trainer.model.config.use_cache is False
    saved = json.loads((out / "config.json").read_text())
    assert saved["vocab_size"] == VOCAB
    assert (out / "model.safetensors").is_file()


def test_example_trains_with_trls_sft_trainer(tmp_path: Path) -> None:
    pytest.importorskip("trl", reason="TRL is in the bench extra")
    import importlib

    rng = np.random.default_rng(4)
    rows = [make_row([30, 20], rng, VOCAB), make_row([64], rng, VOCAB)]
    build = use_quickstart_tokenizer(write_build(tmp_path / "build", {"le_0064": rows}, 16_384, 64))
    example = importlib.import_module("examples.train_with_hf_trainer")
    trainer = example.main(
        [
            str(build),
            "--trainer",
            "trl",
            "--max-steps",
            "2",
            "--out",
            str(tmp_path / "run"),
        ]
    )
    assert type(trainer).__name__ == "SFTTrainer" and trainer.state.global_step == 2
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(np.isfinite(losses))
