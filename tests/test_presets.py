from dataclasses import fields

import pytest
import torch

from longdata.trainer import load_model
from longdata.trainer.config import TrainConfig
from longdata.trainer.model import PRESETS

# The rope base each preset documents (trainer/model.py). niah-tiny's short base once lived only
# in an attribute transformers 5 ignores, so the model it built rotated at tiny-llama's.
ROPE_BASES = {
    "tiny-llama": 500_000.0,
    "tiny-qwen2": 1_000_000.0,
    "niah-tiny": 10_000.0,
    "ruler-tiny": 500_000.0,
}


@pytest.mark.parametrize("preset", sorted(ROPE_BASES))
def test_the_built_model_rotates_at_the_presets_rope_base(preset: str) -> None:
    model = load_model(preset, "sdpa_varlen", vocab_size=256, seed=0)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    expected = ROPE_BASES[preset] ** -exponents
    inv_freq = model.model.rotary_emb.inv_freq.double()
    torch.testing.assert_close(inv_freq, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("preset", ["niah-tiny", "ruler-tiny"])
def test_the_experiment_presets_have_full_multi_head_attention(preset: str) -> None:
    config = load_model(preset, "sdpa_varlen", vocab_size=256, seed=0).config
    assert config.num_key_value_heads == config.num_attention_heads


def test_the_model_settings_help_names_every_preset() -> None:
    # The help is written by hand beside PRESETS; a preset added without it is hidden from --help.
    help_text = next(f for f in fields(TrainConfig) if f.name == "model").metadata["help"]
    assert [name for name in PRESETS if name not in help_text] == []
