"""Memory techniques change nothing but memory: values and gradients equal the plain step.

Each technique (tiled loss, tiled MLP, offloaded checkpoints) is compared to the same
micro-step without it, on packed rows with several samples, padding and a one-token sample,
for both loss modes, full weights and LoRA. FSDP and sequence parallelism are covered in
tests/test_distributed.py. Also: the memory planner against measured peaks.
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import replace

import numpy as np
import pytest
import torch
from transformers import PretrainedConfig

from longdata.trainer import collate, load_model
from longdata.trainer.attention import shifted_sparse_inputs
from longdata.trainer.config import ConfigError, TrainConfig
from longdata.trainer.loss import TargetScorer, step_denominator
from longdata.trainer.memory import (
    PeakTensorMemory,
    ShapesOnly,
    enable_activation_offload,
    enable_tiled_mlp,
    share_adapter_inputs,
)
from longdata.trainer.model import decoder_layers
from longdata.trainer.planner import StepShape, fit_row, fit_split, llama_8b_config, plan_memory
from longdata.trainer.step import micro_step
from tests.builders import make_row

VOCAB = 512
# fp32: chunking sums the same products in another order; differences are rounding (~1e-7).
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}
ROWS = [[7, 12, 1, 9], [5, 17, 3]]  # padded to 32: a padding segment in both rows
LOSS_CHUNK = 5
MLP_CHUNK = 7


def _batch() -> dict:
    rng = np.random.default_rng(1)
    return collate([make_row(lens, rng, VOCAB, target_fraction=0.9) for lens in ROWS], 32)


def _model(lora: bool, checkpointing: bool) -> torch.nn.Module:
    model = load_model("tiny-llama", "sdpa_varlen", vocab_size=VOCAB, seed=0)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora:
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "v_proj", "gate_proj", "down_proj"]
        model = get_peft_model(model, LoraConfig(r=4, target_modules=targets, lora_dropout=0.0))
        # peft starts LoRA's B at zero; nonzero B makes the adapters' gradients depend on all
        # of the forward, so a wrong recomputation would show.
        torch.manual_seed(1)
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.1)
    model.train()
    return model


def _run(
    *,
    loss: str = "token_mean",
    lora: bool = False,
    checkpointing: bool = False,
    loss_chunk: int = 0,
    mlp_chunk: int = 0,
    offload: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One micro-step; returns the per-target losses and every trainable gradient."""
    model = _model(lora, checkpointing)
    if mlp_chunk:
        enable_tiled_mlp(model, mlp_chunk)
    if offload:
        enable_activation_offload(model)
    batch = _batch()
    done = micro_step(TargetScorer(model, loss_chunk), batch, loss, step_denominator(loss, [batch]))
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g.abs().sum() > 0 for g in grads.values())
    return done.losses.values, grads


def _assert_same(expected: tuple, actual: tuple) -> None:
    torch.testing.assert_close(actual[0], expected[0], **TOLERANCE)
    assert expected[1].keys() == actual[1].keys()
    for name in expected[1]:
        torch.testing.assert_close(actual[1][name], expected[1][name], **TOLERANCE, msg=name)


@pytest.mark.parametrize("loss", ["token_mean", "sequence_mean"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_tiled_loss_equals_whole_loss(loss: str, lora: bool) -> None:
    plain = _run(loss=loss, lora=lora)
    _assert_same(plain, _run(loss=loss, lora=lora, loss_chunk=LOSS_CHUNK))


def test_tiled_loss_holds_one_chunk_of_logits_at_a_time() -> None:
    """The output layer only ever sees `chunk` positions: in forward and in the backward
    recomputation (each chunk twice), never all targets at once."""
    model = _model(lora=False, checkpointing=False)
    seen: list[int] = []
    model.get_output_embeddings().register_forward_hook(
        lambda module, args, output: seen.append(args[0].shape[0])
    )
    batch = _batch()
    targets = int(batch["sample_target_counts"].sum())
    micro_step(TargetScorer(model, LOSS_CHUNK), batch, "token_mean", targets)
    chunks = -(-targets // LOSS_CHUNK)
    assert len(seen) == 2 * chunks and max(seen) == LOSS_CHUNK and sum(seen) == 2 * targets


@pytest.mark.parametrize("checkpointing", [False, True], ids=["", "checkpointed"])
def test_tiled_mlp_equals_whole_mlp(checkpointing: bool) -> None:
    plain = _run(checkpointing=checkpointing)
    _assert_same(plain, _run(checkpointing=checkpointing, mlp_chunk=MLP_CHUNK))


def test_tiled_mlp_runs_chunks_of_tokens() -> None:
    model = _model(lora=False, checkpointing=False)
    enable_tiled_mlp(model, MLP_CHUNK)
    seen: list[int] = []
    gate = decoder_layers(model)[0].mlp.gate_proj
    gate.register_forward_hook(lambda module, args, output: seen.append(args[0].shape[0]))
    batch = _batch()
    micro_step(TargetScorer(model), batch, "token_mean", 1)
    tokens = batch["input_ids"].numel()
    assert max(seen) == MLP_CHUNK and sum(seen) == 2 * tokens  # forward + recomputation


def test_offload_holds_exactly_the_checkpointed_layer_inputs() -> None:
    """With offload on, the hook holds each layer's input hidden state (on a GPU these are what
    move to the host) and nothing else, and releases them after backward."""
    plain = _run(checkpointing=True)
    model = _model(lora=False, checkpointing=True)
    offload = enable_activation_offload(model)
    held_after_forward: list[int] = []
    model.get_decoder().norm.register_forward_hook(
        lambda *_: held_after_forward.append(offload.host_bytes)
    )
    batch = _batch()
    done = micro_step(
        TargetScorer(model), batch, "token_mean", step_denominator("token_mean", [batch])
    )
    layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    assert held_after_forward == [layers * batch["input_ids"].numel() * hidden * 4]
    assert offload.host_bytes == 0
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    _assert_same(plain, (done.losses.values, grads))


@pytest.mark.parametrize("offload_layers", [0, 1])
def test_split_offload_holds_the_first_layers_and_stays_exact(offload_layers: int) -> None:
    plain = _run(checkpointing=True)
    model = _model(lora=False, checkpointing=True)
    offload = enable_activation_offload(model, offload_layers)
    held: list[int] = []
    model.get_decoder().norm.register_forward_hook(lambda *_: held.append(offload.host_bytes))
    batch = _batch()
    done = micro_step(
        TargetScorer(model), batch, "token_mean", step_denominator("token_mean", [batch])
    )
    assert model.config.num_hidden_layers > offload_layers  # a real split: some stay put
    assert held == [offload_layers * batch["input_ids"].numel() * model.config.hidden_size * 4]
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    _assert_same(plain, (done.losses.values, grads))


def test_offload_layers_beyond_the_model_is_refused() -> None:
    with pytest.raises(ValueError, match="offload_layers must be 0..2"):
        enable_activation_offload(_model(lora=False, checkpointing=True), 3)


def test_offload_needs_checkpointing() -> None:
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        enable_activation_offload(_model(lora=False, checkpointing=False))


@pytest.mark.parametrize("loss", ["token_mean", "sequence_mean"])
def test_all_techniques_together_with_lora(loss: str) -> None:
    plain = _run(loss=loss, lora=True)
    together = _run(
        loss=loss,
        lora=True,
        checkpointing=True,
        loss_chunk=LOSS_CHUNK,
        mlp_chunk=MLP_CHUNK,
        offload=True,
    )
    _assert_same(plain, together)


# ---------------------------------------------------------------------------------------------
# The planner against measured peaks


def _shape(tokens: int, targets: int | None = None, **settings: object) -> StepShape:
    """The planner's shape of a `TrainConfig` with `settings` (its defaults otherwise)."""
    return StepShape.from_config(TrainConfig(**settings), tokens, targets)


PLANNER_TOLERANCE = 0.10
CHUNK = 256  # loss and MLP chunks of the measured steps
PLANNER_CASES = {
    # name: (preset, row tokens, target tokens, vocab, settings besides TrainConfig's defaults)
    "plain": ("tiny-llama", 4096, None, 512, {"tiled_loss": False}),
    "loss-dominated": ("tiny-llama", 2048, None, 16384, {"tiled_loss": False}),
    "tiled-checkpointed": ("tiny-qwen2", 4096, None, 512, {"gradient_checkpointing": True}),
    "everything": (
        "tiny-llama",
        2048,
        None,
        16384,
        {"gradient_checkpointing": True, "tiled_mlp": True},
    ),
    "lora-sft": ("tiny-llama", 4096, 400, 4096, {"lora": True, "tiled_loss": False}),
    "shifted-sparse": (
        "tiny-llama",
        4096,
        None,
        512,
        {"attention_pattern": "shifted_sparse", "s2_group": 512},
    ),
}
# Issue 21's runs (LoRA r16 on q/k/v/o, every token a target) per technique, weights dtype and
# depth, at Llama-3.1-8B's proportions (MLP 3.5x hidden, 4 query heads per KV head) and 1/16 of
# its width, so that a step takes a second on a CPU (per-token bytes scale with the width).
TECHNIQUE_LADDER = {
    "plain": {"tiled_loss": False},
    "checkpointed": {"gradient_checkpointing": True},  # + TrainConfig's default tiled loss
    "tiled-mlp": {"gradient_checkpointing": True, "tiled_mlp": True},
    "offloaded": {"gradient_checkpointing": True, "tiled_mlp": True, "offload_activations": True},
}
WEIGHT_DTYPES = {
    "fp32": {"weights": "fp32", "precision": "fp32"},
    "fp32-autocast": {"weights": "fp32", "precision": "bf16"},
    "bf16": {"weights": "bf16", "precision": "bf16"},
}


def _reduced_8b(layers: int) -> PretrainedConfig:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=2048,
        hidden_size=256,
        intermediate_size=896,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=1,
        tie_word_embeddings=False,
    )


def _measured_peak(
    model_config: str | PretrainedConfig, vocab: int, shape: StepShape, arithmetic: bool = False
) -> tuple[int, torch.nn.Module]:
    """Tensor bytes at the peak of a second training step (optimizer state allocated) of the
    step `shape` describes, on the CPU (where offloaded checkpoints stay in the same memory).
    The matrix products skip their arithmetic (`ShapesOnly`) unless `arithmetic`."""
    dtype = torch.bfloat16 if shape.weights == "bf16" else torch.float32
    backend = "sdpa_varlen" if shape.attention == "auto" else shape.attention
    model = load_model(model_config, backend, vocab_size=vocab, seed=0, dtype=dtype)
    if shape.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if shape.lora:
        from peft import LoraConfig, get_peft_model

        targets = list(shape.lora_targets)
        model = get_peft_model(model, LoraConfig(r=shape.lora_rank, target_modules=targets))
        if shape.precision == "bf16":  # as the trainer builds it
            share_adapter_inputs(model)
    if shape.tiled_mlp:
        enable_tiled_mlp(model, shape.mlp_chunk_tokens)
    if shape.offload_activations:
        enable_activation_offload(model, shape.offload_layers)
    model.train()
    tokens = shape.row_tokens
    targets = tokens - 1 if shape.target_tokens is None else shape.target_tokens
    rng = np.random.default_rng(0)
    loss_mask = np.zeros(tokens, dtype=np.uint8)
    loss_mask[tokens - targets :] = 1  # a target is predicted from the position before it
    row = {
        "input_ids": rng.integers(5, vocab, tokens).astype(np.uint32),
        "loss_mask": loss_mask,
        "seq_lens": np.array([tokens], dtype=np.uint32),
        "source_ids": np.zeros(1, dtype=np.uint16),
    }
    batch = collate([row])
    if shape.attention_pattern == "shifted_sparse":
        batch = {**batch, **shifted_sparse_inputs(batch, shape.s2_group)}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scorer = TargetScorer(model, shape.loss_chunk_tokens if shape.tiled_loss else 0)

    def step() -> None:
        autocast = torch.autocast("cpu", dtype=torch.bfloat16)
        precision = autocast if shape.precision == "bf16" else None
        denominator = step_denominator("token_mean", [batch])
        micro_step(scorer, batch, "token_mean", denominator, precision=precision)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with contextlib.nullcontext() if arithmetic else ShapesOnly():
        step()
        existing = [*model.parameters()] + [
            t for state in optimizer.state.values() for t in state.values() if t.dim() > 0
        ]
        meter = PeakTensorMemory()
        with meter:
            step()
    return meter.peak_bytes + sum(t.numel() * t.element_size() for t in existing), model


def _assert_planned_within_tolerance(
    model_config: str | PretrainedConfig, vocab: int, shape: StepShape
) -> None:
    measured, model = _measured_peak(model_config, vocab, shape)
    plan = plan_memory(model.config, shape)
    planned = plan.peak_bytes + plan.host_bytes  # on the CPU the host is the device
    assert abs(planned - measured) <= PLANNER_TOLERANCE * measured, (planned, measured)


@pytest.mark.parametrize("case", PLANNER_CASES)
def test_planner_is_within_10_percent_of_measured_peaks(case: str) -> None:
    preset, tokens, targets, vocab, settings = PLANNER_CASES[case]
    dtype = {"precision": "fp32", "weights": "fp32"}
    shape = _shape(
        tokens,
        # the last position predicts nothing
        (targets or tokens) - 1,
        loss_chunk_tokens=CHUNK,
        mlp_chunk_tokens=CHUNK,
        **settings,
        **dtype,
    )
    _assert_planned_within_tolerance(preset, vocab, shape)


@pytest.mark.parametrize(
    ("model_config", "vocab", "shape"),
    [
        *(
            (preset, vocab, _shape(tokens, None, **settings, precision="fp32", weights="fp32"))
            for preset, tokens, _, vocab, settings in PLANNER_CASES.values()
        ),
        (
            _reduced_8b(1),
            2048,
            _shape(2048, None, lora=True, **TECHNIQUE_LADDER["offloaded"], **WEIGHT_DTYPES["bf16"]),
        ),
    ],
    ids=[*PLANNER_CASES, "offloaded-bf16-1"],
)
def test_a_peak_measured_without_the_products_arithmetic_is_the_same(
    model_config: str | PretrainedConfig, vocab: int, shape: StepShape
) -> None:
    """The planner's tests measure under `ShapesOnly`; what a step allocates does not depend on
    the values its products compute, so the peak is the same to the byte."""
    with_arithmetic, _ = _measured_peak(model_config, vocab, shape, arithmetic=True)
    shapes_only, _ = _measured_peak(model_config, vocab, shape)
    assert shapes_only == with_arithmetic


@pytest.mark.parametrize("layers", [1, 2, 4])
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
@pytest.mark.parametrize("technique", TECHNIQUE_LADDER)
def test_planner_is_within_10_percent_at_8b_proportions(
    technique: str, dtype: str, layers: int
) -> None:
    shape = _shape(
        2048,
        2047,
        lora=True,
        lora_rank=16,
        loss_chunk_tokens=CHUNK,
        mlp_chunk_tokens=CHUNK,
        **TECHNIQUE_LADDER[technique],
        **WEIGHT_DTYPES[dtype],
    )
    _assert_planned_within_tolerance(_reduced_8b(layers), 2048, shape)


def test_shared_adapter_inputs_change_nothing_but_memory() -> None:
    """Under bf16 autocast, LoRA adapters taking their bf16 input as it is compute the loss and
    every adapter gradient bit for bit as with peft's fp32 round trip, and the step holds less."""
    from peft import LoraConfig, get_peft_model

    rng = np.random.default_rng(0)
    batch = collate([make_row([50, 30, 20], rng, VOCAB, target_fraction=0.9)], 128)
    results = []
    for shared in (False, True):
        model = load_model("tiny-llama", "sdpa_varlen", vocab_size=VOCAB, seed=0)
        model = get_peft_model(
            model.to(torch.bfloat16),
            LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        )
        torch.manual_seed(1)
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # nonzero, so every adapter's input gradient flows too
                torch.nn.init.normal_(parameter, std=0.02)
        if shared:
            share_adapter_inputs(model)
        meter = PeakTensorMemory()
        with meter:
            step = micro_step(
                TargetScorer(model, 0),
                batch,
                "token_mean",
                step_denominator("token_mean", [batch]),
                precision=torch.autocast("cpu", dtype=torch.bfloat16),
            )
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((step.loss, grads, meter.peak_bytes))
    (cast_loss, cast_grads, cast_peak), (shared_loss, shared_grads, shared_peak) = results
    assert shared_loss == cast_loss
    assert cast_grads.keys() == shared_grads.keys() and len(cast_grads) == 16
    assert all(torch.equal(shared_grads[n], cast_grads[n]) for n in cast_grads)
    assert shared_peak < cast_peak, (shared_peak, cast_peak)


@pytest.mark.parametrize(
    ("weights", "techniques"),
    [
        ("bf16", "ckpt,loss,mlp"),  # the peak: the recomputed output projection's LoRA forward
        ("bf16", "ckpt,loss"),  # the peak: the MLP's backward
        ("bf16", "ckpt,loss,mlp,offload"),
        ("bf16", "loss"),
        ("fp32", "ckpt,loss,mlp"),  # the peak: the tiled MLP's backward
        ("fp32", "ckpt,loss"),
    ],
)
def test_planner_is_within_10_percent_of_the_step_activations_at_a_quarter_of_8b(
    weights: str, techniques: str
) -> None:
    """The step's own bytes (no weights or optimizer state to hide an error behind) at a
    quarter of Llama-3.1-8B's width, measured part by part as `benchmarks/memory_parts.py`
    measures the full width."""
    memory_parts = importlib.import_module("benchmarks.memory_parts")
    config = memory_parts.llama_8b_width(layers=1, vocab=2048, divisor=4)
    chosen = set(techniques.split(","))
    measured = memory_parts.measure(config, 2048, weights, chosen, stock_norms=False).peak_bytes
    planned = memory_parts.planned_step_bytes(config, 2048, weights, chosen)
    assert abs(planned - measured) <= PLANNER_TOLERANCE * measured, (planned, measured)


def test_longest_row_is_the_longest_that_fits() -> None:
    from longdata.trainer.planner import longest_row

    config = llama_8b_config()
    shape = _shape(1, lora=True, weights="fp32", gradient_checkpointing=True)
    budget = 80 * 2**30
    longest = longest_row(config, shape, budget)
    assert longest > 0 and longest % 1024 == 0
    assert plan_memory(config, replace(shape, row_tokens=longest)).peak_bytes <= budget
    assert plan_memory(config, replace(shape, row_tokens=longest + 1024)).peak_bytes > budget
    # Each technique lengthens the row that fits; SP 8 splits it over 8 devices.
    offloaded = replace(shape, tiled_mlp=True, offload_activations=True)
    assert longest_row(config, offloaded, budget) > longest
    assert longest_row(config, replace(shape, sp=8), budget) > 4 * longest


def test_plan_memory_command() -> None:
    import typer
    from typer.testing import CliRunner

    from longdata.trainer import cli

    app = typer.Typer()
    app.command("plan-memory")(cli.plan_memory)
    app.command("other")(lambda: None)  # two commands: typer then dispatches by name
    shown = CliRunner().invoke(app, ["plan-memory", "--lora", "--tokens", "131072", "--sp", "8"])
    assert shown.exit_code == 0, shown.output
    assert "| kept activations |" in shown.output
    assert "longest row that fits 80 GiB per device:" in shown.output
    refused = CliRunner().invoke(app, ["plan-memory", "--precision", "fp16"])
    assert refused.exit_code == 2
    assert refused.output.strip().splitlines() == [
        "error: precision must be one of auto, fp32, bf16, not 'fp16'"
    ]


def _long_row_shape(weights: str = "bf16") -> StepShape:
    return _shape(
        65_536,
        lora=True,
        lora_rank=16,
        weights=weights,
        gradient_checkpointing=True,
        tiled_mlp=True,
        offload_activations=True,
    )


def test_longest_row_respects_host_memory_with_a_split() -> None:
    """The issue's H200 machine (139 GiB GPU, 125 GiB host): offloading every layer would put
    more on the host than it has; the answer splits the layers between host and device."""
    config, gib = llama_8b_config(), 2**30
    device, host = 139 * gib, 125 * gib
    unlimited, unlimited_plan = fit_row(config, _long_row_shape(), device)
    assert unlimited_plan.host_bytes > host  # what the planner used to answer
    tokens, plan = fit_row(config, _long_row_shape(), device, host)
    assert 0 < tokens < unlimited
    assert plan.peak_bytes <= device and plan.host_bytes <= host
    assert 0 < plan.shape.offload_layers < config.num_hidden_layers
    assert fit_split(config, replace(plan.shape, row_tokens=tokens + 1024), device, host) is None
    # Offloading one layer fewer would not fit the device.
    fewer = replace(plan.shape, offload_layers=plan.shape.offload_layers - 1)
    assert plan_memory(config, fewer).peak_bytes > device


def test_fp8_weights_lengthen_the_row() -> None:
    config, gib = llama_8b_config(), 2**30
    bf16 = plan_memory(config, _long_row_shape("bf16"))
    fp8 = plan_memory(config, _long_row_shape("fp8"))
    assert bf16.parts["weights"] - fp8.parts["weights"] > 6 * gib
    assert (
        fit_row(config, _long_row_shape("fp8"), 80 * gib, 125 * gib)[0]
        > fit_row(config, _long_row_shape("bf16"), 80 * gib, 125 * gib)[0]
    )
    with pytest.raises(ValueError, match="fp8 needs lora"):
        replace(_long_row_shape("fp8"), lora=False)


def test_plan_memory_command_splits_offload_for_the_host() -> None:
    import typer
    from typer.testing import CliRunner

    from longdata.trainer import cli

    app = typer.Typer()
    app.command("plan-memory")(cli.plan_memory)
    app.command("other")(lambda: None)
    arguments = ["--lora", "--weights", "bf16", "--gradient-checkpointing", "--tiled-mlp"]
    arguments.append("--offload-activations")
    shown = CliRunner().invoke(
        app, ["plan-memory", *arguments, "--device-gib", "139", "--host-gib", "125"]
    )
    assert shown.exit_code == 0, shown.output
    assert "fits 139 GiB per device and 125 GiB of host:" in shown.output
    assert "offloading the first" in shown.output


def test_peak_tensor_memory_counts_allocations_not_views_or_in_place_results() -> None:
    from longdata.trainer.memory import PeakTensorMemory

    weight = torch.randn(256, 256)
    meter = PeakTensorMemory()
    with meter:
        transposed = weight.t()  # a view: no new storage
        weight.mul_(2)  # in place: returns the input's storage
        product = transposed @ weight  # the only allocation
    assert product.shape == (256, 256)
    assert meter.peak_bytes == 256 * 256 * 4


def test_step_shape_takes_every_default_from_train_config() -> None:
    """A default lives in `TrainConfig` alone: `StepShape` has none, and every setting the planner
    reads follows the config (a changed value reaches the shape)."""
    import dataclasses

    from longdata.trainer.planner import PLANNED_SETTINGS

    assert all(
        f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        for f in dataclasses.fields(StepShape)
    )
    defaults = StepShape.from_config(TrainConfig(), 4096)
    assert defaults.tiled_loss is TrainConfig().tiled_loss is True
    changed = {
        "lora": True,
        "lora_rank": 32,
        "lora_targets": ["q_proj"],
        "precision": "fp32",
        "weights": "bf16",
        "sp": 2,
        "attention": "sdpa_mask",
        "attention_pattern": "shifted_sparse",
        "s2_group": 0.5,
        "gradient_checkpointing": True,
        "tiled_loss": False,
        "loss_chunk_tokens": 7,
        "tiled_mlp": True,
        "mlp_chunk_tokens": 9,
        "offload_activations": True,
        "offload_layers": 1,
    }
    assert set(changed) == set(PLANNED_SETTINGS)
    shape = StepShape.from_config(TrainConfig(**changed), 4096)
    for name, value in changed.items():
        expected = tuple(value) if isinstance(value, list) else value
        assert getattr(shape, name) == expected != getattr(defaults, name), name


def test_step_shape_resolves_auto_as_the_trainer_does_on_a_bf16_gpu() -> None:
    assert _shape(1024).precision == "bf16"
    assert _shape(1024).weights == "fp32"  # full fine-tuning keeps fp32 master weights
    assert _shape(1024, lora=True).weights == "bf16"


def test_plan_memory_options_are_generated_from_train_config() -> None:
    import inspect

    from longdata.trainer import cli
    from longdata.trainer.config import FIELDS
    from longdata.trainer.planner import PLANNED_SETTINGS

    parameters = inspect.signature(cli.plan_memory).parameters
    for name in PLANNED_SETTINGS:
        option = parameters[name].annotation.__metadata__[0]
        assert option.help == FIELDS[name].metadata["help"], name
        assert parameters[name].default is None  # "not given": TrainConfig's default applies


def _plan_memory_cli(*arguments: str):  # type: ignore[no-untyped-def]
    import typer
    from typer.testing import CliRunner

    from longdata.trainer import cli

    app = typer.Typer()
    app.command("plan-memory")(cli.plan_memory)
    app.command("other")(lambda: None)  # two commands: typer then dispatches by name
    return CliRunner().invoke(app, ["plan-memory", *arguments])


def test_offload_layers_beyond_the_model_is_one_line() -> None:
    arguments = ["--gradient-checkpointing", "--offload-activations", "--offload-layers", "33"]
    refused = _plan_memory_cli(*arguments)
    assert refused.exit_code == 2
    assert refused.output.strip().splitlines() == [
        "error: offload_layers must be 0..32 (the model's layers), not 33"
    ]
    offloading = {"gradient_checkpointing": True, "offload_activations": True}
    with pytest.raises(ConfigError, match="offload_layers must be 0..32"):
        plan_memory(llama_8b_config(), _shape(1024, **offloading, offload_layers=33))


def test_shifted_sparse_attention_flops_follow_the_trainers_groups() -> None:
    """The planner's attention FLOPs under S2-Attn count the groups the trainer forms
    (`shifted_sparse_inputs`, as the loop's MFU does), a quarter-row group costing about a quarter
    of full attention; the memory plan of the varlen path grows by the repeated K and V."""
    from longdata.trainer.flops import squared_group_lengths, squared_sample_lengths
    from longdata.trainer.planner import squared_attention_lengths

    tokens = 1000
    shape = _shape(tokens, attention_pattern="shifted_sparse", s2_group=0.25)
    batch = collate([make_row([tokens], np.random.default_rng(0), VOCAB)])
    groups = shifted_sparse_inputs(batch, 0.25)["s2_group_ids"]
    squares = squared_attention_lengths(shape)
    assert squares["full"] == squared_sample_lengths(batch) == tokens**2
    assert squares["shifted_sparse"] == squared_group_lengths(batch, groups)
    config = llama_8b_config()
    full = plan_memory(config, _shape(131_072, lora=True))
    sparse = plan_memory(config, _shape(131_072, lora=True, attention_pattern="shifted_sparse"))
    assert 0.2 < sparse.attention_flops["shifted_sparse"] / full.attention_flops["full"] < 0.25
    assert sparse.attention_flops["full"] == full.attention_flops["full"]
    assert "shifted_sparse" not in full.attention_flops
    assert sparse.peak_bytes > full.peak_bytes  # K and V repeated to every query head
    shown = _plan_memory_cli("--lora", "--attention-pattern", "shifted_sparse")
    assert shown.exit_code == 0, shown.output
    assert "| shifted_sparse |" in shown.output and "| full |" in shown.output


def test_plan_memory_command_bounds_the_row_by_host_memory(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The issue's question, on a Hugging Face model directory: the longest row that fits an
    80 GiB GPU and a 125 GiB host; a smaller host gives a shorter row."""
    llama_8b_config().save_pretrained(tmp_path)
    arguments = ["--model", str(tmp_path), "--lora", "--tokens", "393216", "--device-gib", "80"]
    arguments += ["--gradient-checkpointing", "--tiled-mlp", "--offload-activations"]

    def longest(host_gib: str) -> int:
        shown = _plan_memory_cli(*arguments, "--host-gib", host_gib)
        assert shown.exit_code == 0, shown.output
        line = next(line for line in shown.output.splitlines() if "longest row" in line)
        return int(line.rsplit(": ", 1)[1].split()[0].replace(",", ""))

    assert 0 < longest("32") < longest("125") < longest("100000")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("norm_class", ["LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm"])
def test_lean_rms_norm_is_transformers_norm_with_less_memory(norm_class: str, dtype) -> None:  # type: ignore[no-untyped-def]
    """Same outputs bit for bit, the same gradients to rounding (one bf16 step), and a fraction
    of the memory: the stock norm keeps an fp32 copy of a bf16 input and its backward holds
    several fp32 row-sized temporaries; the lean one, a chunk's."""
    import importlib

    from longdata.trainer.memory import PeakTensorMemory
    from longdata.trainer.rms_norm import LEAN_NORM_CLASSES, use_lean_rms_norms

    assert norm_class in LEAN_NORM_CLASSES
    family = norm_class.removesuffix("RMSNorm").lower()
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    torch.manual_seed(0)
    stock = getattr(module, norm_class)(256).to(dtype)
    torch.nn.init.normal_(stock.weight)
    lean = getattr(module, norm_class)(256).to(dtype)
    lean.load_state_dict(stock.state_dict())
    assert use_lean_rms_norms(torch.nn.Sequential(lean)) == 1
    hidden = torch.randn(2, 2000, 256, dtype=dtype)
    upstream = torch.randn(2, 2000, 256, dtype=dtype)
    results = []
    for norm in (stock, lean):
        given = hidden.clone().requires_grad_()
        meter = PeakTensorMemory()
        with meter:
            output = norm(given)
            output.backward(upstream)
        results.append((output.detach(), given.grad, norm.weight.grad, meter.peak_bytes))
    (stock_out, stock_grad, stock_weight_grad, stock_peak) = results[0]
    (lean_out, lean_grad, lean_weight_grad, lean_peak) = results[1]
    assert torch.equal(lean_out, stock_out)
    step = 2**-7 if dtype == torch.bfloat16 else 1e-6  # one bf16 rounding step, relative
    torch.testing.assert_close(lean_grad, stock_grad, rtol=step, atol=step)
    torch.testing.assert_close(lean_weight_grad, stock_weight_grad, rtol=1e-5, atol=1e-3)
    assert lean_peak < 0.7 * stock_peak
    # The forward alone holds its output, the per-token scale and one chunk's fp32 temporaries
    # (at most four chunk-sized tensors), never a row-sized fp32 one.
    from longdata.trainer.rms_norm import CHUNK_TOKENS

    meter = PeakTensorMemory()
    with meter:
        output = lean(hidden.clone().requires_grad_())
    per_token_scale = hidden.numel() // hidden.shape[-1] * 4
    chunk_temporaries = 4 * CHUNK_TOKENS * hidden.shape[-1] * 4
    clone = hidden.numel() * hidden.element_size()
    limit = clone + output.numel() * output.element_size() + per_token_scale + chunk_temporaries
    assert meter.peak_bytes <= limit, (meter.peak_bytes, limit)
