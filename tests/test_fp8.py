"""weights: fp8 -- frozen linears stored as float8 e4m3 with per-output-channel scales."""

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig

from longdata.trainer import collate, load_model
from longdata.trainer.check import max_packing_error
from longdata.trainer.fp8 import FP8, Float8Linear, quantize_frozen_linears, quantize_weight
from longdata.trainer.model import decoder_layers
from longdata.trainer.planner import ModelDims, llama_8b_config, weight_bytes_of
from tests.builders import make_row

VOCAB = 512
# Measured on this shape (seed 0, 96 tokens, random init): logits 0.059 (norm of the difference
# over the norm), loss 3.0e-4, relative to bf16 weights. The bounds leave margin; skipping
# quantisation gives exactly 0 and fails the logits check.
LOGITS_RELATIVE_ERROR = 0.1
LOSS_RELATIVE_ERROR = 1e-3
PACKING_TOLERANCE = 1e-5


def _llama(dtype: torch.dtype) -> torch.nn.Module:
    """A small Llama shape (GQA, gated MLP) with LoRA on q/k/v/o, as `weights: fp8` trains."""
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    model = load_model(config, "sdpa_varlen", dtype=dtype, seed=0)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = get_peft_model(model, lora)
    # peft inits lora_B at zero; a nonzero adapter makes the gradient test see the adapters work.
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.02)
    return model


def _batch(rows: list[list[int]], seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return collate([make_row(lens, rng, VOCAB) for lens in rows])


def _frozen_linear_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(weight bytes, output channels) of every frozen linear base of the decoder layers."""
    size = channels = 0
    for layer in decoder_layers(model):
        for module in layer.modules():
            if isinstance(module, (torch.nn.Linear, Float8Linear)):
                if not module.weight.requires_grad:
                    size += module.weight.numel() * module.weight.element_size()
                    channels += module.out_features
    return size, channels


def _loss_and_logits(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    out = model(**inputs, labels=batch["labels"])
    return out.loss, out.logits


def test_quantize_weight_round_trips_within_e4m3_precision() -> None:
    weight = torch.randn(64, 32) * torch.logspace(-3, 1, 64)[:, None]  # channels of every scale
    fp8, scale = quantize_weight(weight)
    assert fp8.dtype == FP8 and scale.shape == (64,)
    restored = fp8.float() * scale[:, None]
    # e4m3 keeps 3 mantissa bits: relative rounding error <= 2^-4 of each channel's amax.
    error = (restored - weight).abs() / weight.abs().amax(dim=1, keepdim=True)
    assert 0 < float(error.max()) <= 2**-4


def test_weight_bytes_halve_against_bf16() -> None:
    model = _llama(torch.bfloat16)
    bf16_bytes, channels = _frozen_linear_bytes(model)
    assert quantize_frozen_linears(model) == 2 * 7  # 4 LoRA bases + 3 MLP linears per layer
    fp8_bytes, _ = _frozen_linear_bytes(model)
    scale_bytes = sum(
        module.weight_scale.numel() * 4
        for module in model.modules()
        if isinstance(module, Float8Linear)
    )
    assert fp8_bytes == bf16_bytes // 2
    assert scale_bytes == 4 * channels


def test_planner_weight_bytes_of_the_8b_shape() -> None:
    dims = ModelDims.of(llama_8b_config())
    bf16, fp8 = weight_bytes_of(dims, "bf16"), weight_bytes_of(dims, "fp8")
    linears = dims.layers * sum(a * b for a, b in dims.linear_shapes().values())
    channels = dims.layers * sum(b for _, b in dims.linear_shapes().values())
    assert bf16 - fp8 == linears - 4 * channels  # 1 byte per linear weight saved, scales added
    assert 14.9 < bf16 / 2**30 < 15.0 and 8.4 < fp8 / 2**30 < 8.5  # embeddings + lm_head stay


def test_logits_and_loss_stay_close_to_bf16_weights() -> None:
    batch = _batch([[40, 24, 32]])
    model = _llama(torch.bfloat16)
    with torch.no_grad():
        loss_bf16, logits_bf16 = _loss_and_logits(model, batch)
        quantize_frozen_linears(model)
        loss_fp8, logits_fp8 = _loss_and_logits(model, batch)
    logits_error = float(
        (logits_fp8.float() - logits_bf16.float()).norm() / logits_bf16.float().norm()
    )
    loss_error = abs(float(loss_fp8) - float(loss_bf16)) / float(loss_bf16)
    assert 0 < logits_error <= LOGITS_RELATIVE_ERROR
    assert loss_error <= LOSS_RELATIVE_ERROR


def test_quantisation_is_not_skipped() -> None:
    model = _llama(torch.bfloat16)
    quantize_frozen_linears(model)
    for layer in decoder_layers(model):
        attention = layer.self_attn
        assert attention.q_proj.base_layer.weight.dtype == FP8
        assert layer.mlp.down_proj.weight.dtype == FP8
        assert attention.q_proj.lora_A["default"].weight.dtype == torch.float32
    base = model.get_base_model()
    assert base.lm_head.weight.dtype == torch.bfloat16
    assert base.model.embed_tokens.weight.dtype == torch.bfloat16


def test_gradients_flow_only_to_adapters() -> None:
    model = _llama(torch.bfloat16)
    quantize_frozen_linears(model)
    loss, _ = _loss_and_logits(model, _batch([[30, 34]]))
    loss.backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable and with_grad
    assert all("lora_" in name for name in with_grad)
    assert all(float(model.get_parameter(name).grad.abs().max()) > 0 for name in with_grad)


@pytest.mark.parametrize("rows", [[[7, 12, 1, 9]], [[5, 17, 3], [11, 4, 9, 2]]])
def test_packed_equals_alone_under_fp8(rows: list[list[int]]) -> None:
    # fp32 activations around the fp8 weights: the packing comparison stays exact to 1e-5.
    model = _llama(torch.float32)
    quantize_frozen_linears(model)
    error = max_packing_error(model, _batch(rows, seed=3))
    assert error.logits <= PACKING_TOLERANCE and error.grads <= PACKING_TOLERANCE
