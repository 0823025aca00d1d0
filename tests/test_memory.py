"""Memory techniques change nothing but memory: values and gradients equal the plain step.

Each technique (tiled loss, tiled MLP, offloaded checkpoints) is compared to the same
micro-step without it, on packed rows with several samples, padding and a one-token sample,
for both loss modes, full weights and LoRA. FSDP and sequence parallelism are covered in
tests/test_distributed.py. Also: the memory planner against measured peaks.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from longdata.trainer import collate, load_model
from longdata.trainer.loss import TargetScorer, step_denominator
from longdata.trainer.memory import enable_activation_offload, enable_tiled_mlp
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

PLANNER_TOLERANCE = 0.15
PLANNER_CASES = {
    # name: (preset, row tokens, target tokens, vocab, techniques)
    "plain": ("tiny-llama", 4096, None, 512, {}),
    "loss-dominated": ("tiny-llama", 2048, None, 16384, {}),
    "tiled-checkpointed": (
        "tiny-qwen2",
        4096,
        None,
        512,
        {"tiled_loss": True, "gradient_checkpointing": True},
    ),
    "everything": (
        "tiny-llama",
        2048,
        None,
        16384,
        {"tiled_loss": True, "gradient_checkpointing": True, "tiled_mlp": True},
    ),
    "lora-sft": ("tiny-llama", 4096, 400, 4096, {"lora": True}),
}


def _measured_peak(
    preset: str, tokens: int, targets: int | None, vocab: int, techniques: dict
) -> tuple[int, torch.nn.Module]:
    """Tensor bytes at the peak of a second training step (optimizer state allocated)."""
    from longdata.trainer.memory import PeakTensorMemory

    model = load_model(preset, "sdpa_varlen", vocab_size=vocab, seed=0)
    if techniques.get("gradient_checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if techniques.get("lora"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        )
    if techniques.get("tiled_mlp"):
        enable_tiled_mlp(model, 256)
    model.train()
    rng = np.random.default_rng(0)
    loss_mask = np.zeros(tokens, dtype=np.uint8)
    loss_mask[tokens - (targets or tokens) + 1 :] = 1
    row = {
        "input_ids": rng.integers(5, vocab, tokens).astype(np.uint32),
        "loss_mask": loss_mask,
        "seq_lens": np.array([tokens], dtype=np.uint32),
        "source_ids": np.zeros(1, dtype=np.uint16),
    }
    batch = collate([row])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scorer = TargetScorer(model, 256 if techniques.get("tiled_loss") else 0)

    def step() -> None:
        micro_step(scorer, batch, "token_mean", step_denominator("token_mean", [batch]))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    existing = [*model.parameters()] + [
        t for state in optimizer.state.values() for t in state.values() if t.dim() > 0
    ]
    meter = PeakTensorMemory()
    with meter:
        step()
    return meter.peak_bytes + sum(t.numel() * t.element_size() for t in existing), model


@pytest.mark.parametrize("case", PLANNER_CASES)
def test_planner_is_within_15_percent_of_measured_peaks(case: str) -> None:

    preset, tokens, targets, vocab, techniques = PLANNER_CASES[case]
    measured, model = _measured_peak(preset, tokens, targets, vocab, techniques)
    shape = StepShape(
        row_tokens=tokens,
        target_tokens=(targets or tokens) - 1,
        loss_chunk_tokens=256,
        mlp_chunk_tokens=256,
        **techniques,
    )
    planned = plan_memory(model.config, shape).peak_bytes
    assert abs(planned - measured) <= PLANNER_TOLERANCE * measured, (planned, measured)


def test_longest_row_is_the_longest_that_fits() -> None:
    from longdata.trainer.planner import longest_row

    config = llama_8b_config()
    shape = StepShape(
        row_tokens=1, lora=True, precision="bf16", gradient_checkpointing=True, tiled_loss=True
    )
    budget = 80 * 2**30
    longest = longest_row(config, shape, budget)
    assert longest > 0 and longest % 1024 == 0
    assert (
        plan_memory(config, StepShape(**{**shape.__dict__, "row_tokens": longest})).peak_bytes
        <= budget
    )
    assert (
        plan_memory(
            config, StepShape(**{**shape.__dict__, "row_tokens": longest + 1024})
        ).peak_bytes
        > budget
    )
    # Each technique lengthens the row that fits; SP 8 splits it over 8 devices.
    offloaded = StepShape(**{**shape.__dict__, "tiled_mlp": True, "offload_activations": True})
    assert longest_row(config, offloaded, budget) > longest
    assert longest_row(config, StepShape(**{**shape.__dict__, "sp": 8}), budget) > 4 * longest


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
    assert refused.exit_code == 2 and "precision must be fp32 or bf16" in refused.output


def _long_row_shape(weights: str = "bf16") -> StepShape:
    return StepShape(
        row_tokens=65_536,
        lora=True,
        lora_rank=16,
        precision="bf16",
        weights=weights,
        gradient_checkpointing=True,
        tiled_loss=True,
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
    arguments = ["--lora", "--weights", "bf16", "--tiled-mlp", "--offload-activations"]
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
