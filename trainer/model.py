"""Load a causal LM whose attention honours the packing metadata of `trainer.collate()`."""

from __future__ import annotations

import difflib
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
)

from longdata.format.remote_code import refuse_remote_code
from longdata.trainer.attention import implementation_name, register_attention_functions
from longdata.trainer.rms_norm import use_lean_rms_norms

DEFAULT_PRESET_VOCAB = 16_384


def _tiny_llama(
    vocab_size: int, key_value_heads: int = 2, rope_theta: float = 500_000.0
) -> PretrainedConfig:
    """Llama 3.x shape (GQA, untied embeddings, large rope theta), scaled down for a CPU.

    Every setting goes through the constructor: transformers 5 keeps the rope base in
    `rope_parameters`, built there, so a `rope_theta` set on the config afterwards is ignored."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=key_value_heads,
        max_position_embeddings=131_072,
        rope_theta=rope_theta,
        tie_word_embeddings=False,
        attention_dropout=0.0,
    )


def _tiny_qwen2(vocab_size: int) -> PretrainedConfig:
    """Qwen2 shape (GQA with biased q/k/v projections, tied embeddings), scaled down."""
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=131_072,
        rope_theta=1_000_000.0,
        tie_word_embeddings=True,
        use_sliding_window=False,
        attention_dropout=0.0,
    )


def _niah_tiny(vocab_size: int) -> PretrainedConfig:
    """tiny-llama sized to learn needle retrieval from scratch on a CPU in under half an hour
    (benchmarks/learn_niah.py): full multi-head attention and a short-context rope base make
    finding the needle easier to learn; two layers suffice for induction-style copying."""
    return _tiny_llama(vocab_size, key_value_heads=4, rope_theta=10_000.0)


def _ruler_tiny(vocab_size: int) -> PretrainedConfig:
    """niah-tiny with Llama 3's rope base, for training to 4K and evaluating at 8K
    (benchmarks/learn_ruler.py): with niah-tiny's short base the slowest rotations at 8K pass
    any the 4K stages saw, and the same curriculum lost NIAH at 8K and multikey at 2K
    (docs/EVAL.md)."""
    return _tiny_llama(vocab_size, key_value_heads=4)


PRESETS = {
    "tiny-llama": _tiny_llama,
    "tiny-qwen2": _tiny_qwen2,
    "niah-tiny": _niah_tiny,
    "ruler-tiny": _ruler_tiny,
}


def model_config(
    name_or_path_or_config: str | Path | PretrainedConfig, vocab_size: int | None = None
) -> PretrainedConfig:
    """Resolve a preset name, a local checkpoint, a hub id or a config object to a config."""
    if isinstance(name_or_path_or_config, PretrainedConfig):
        return name_or_path_or_config
    name = str(name_or_path_or_config)
    if name in PRESETS:
        return PRESETS[name](vocab_size or DEFAULT_PRESET_VOCAB)
    refuse_remote_code(name)
    return AutoConfig.from_pretrained(name, trust_remote_code=False)


def load_model(
    name_or_path_or_config: str | Path | PretrainedConfig = "tiny-llama",
    attention: str = "auto",
    *,
    vocab_size: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    seed: int | None = None,
) -> PreTrainedModel:
    """Build or load a causal LM whose `forward(**collate(rows))` never crosses samples.

    `name_or_path_or_config` is a preset (`tiny-llama`, `tiny-qwen2`: random init, with
    `vocab_size` defaulting to 16,384), a `transformers.PretrainedConfig` (random init), a local
    Hugging Face checkpoint directory or a hub id (pretrained weights). `attention` is one of
    `trainer.attention.BACKENDS` or `auto`; `seed` fixes the random init.

    The model's KV cache is off by default (`config.use_cache = False`): training never needs it
    and it would hold every layer's keys for nothing. `generate` still turns it on. Its RMSNorms
    get a lean backward (`trainer.rms_norm`: same forward, far less memory in backward).
    """
    register_attention_functions()
    attn_implementation = implementation_name(attention)
    if seed is not None:
        torch.manual_seed(seed)
    is_checkpoint = not isinstance(name_or_path_or_config, PretrainedConfig) and (
        str(name_or_path_or_config) not in PRESETS
    )
    if is_checkpoint:
        name = str(name_or_path_or_config)
        # A near-miss of a preset name is a typo, not a hub id to spend retries looking up.
        near = difflib.get_close_matches(name, PRESETS, n=1, cutoff=0.75)
        if near and not Path(name).exists():
            raise ValueError(
                f"model {name!r} is not a preset ({', '.join(PRESETS)}); did you mean {near[0]!r}?"
            )
        refuse_remote_code(name)
        try:
            # Loaded straight onto the device in `dtype`: no fp32 copy on the host first.
            model = AutoModelForCausalLM.from_pretrained(
                name,
                attn_implementation=attn_implementation,
                dtype=dtype,
                device_map=None if device is None else torch.device(device),
                trust_remote_code=False,
            )
        except OSError as error:
            # transformers explains a failed hub lookup over many lines; one is enough here.
            reason = next((line for line in str(error).splitlines() if line.strip()), "")
            raise ValueError(
                f"model {name!r} is not a preset ({', '.join(PRESETS)}), "
                f"a local checkpoint directory, or a hub id that loads here ({reason})"
            ) from None
    else:
        config = model_config(name_or_path_or_config, vocab_size)
        # Initialised on the device in `dtype`: an 8B model built in fp32 on the host and then
        # moved costs ~40 s and 30 GiB of host memory before a single token.
        with torch.device("cpu" if device is None else device):
            model = AutoModelForCausalLM.from_config(
                config,
                attn_implementation=attn_implementation,
                dtype=dtype,
                trust_remote_code=False,
            )
    model.config.use_cache = False
    use_lean_rms_norms(model)
    return model


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks: the repeated children of the model's `layers` ModuleList (found
    through any wrapper: peft, DDP, the trainer's loss module)."""
    for name, child in model.named_modules():
        if name.endswith("layers") and isinstance(child, torch.nn.ModuleList):
            return list(child)
    raise ValueError("found no decoder `layers` ModuleList")


def set_attention(model: PreTrainedModel, attention: str) -> None:
    """Switch a loaded model to another packing-aware attention backend."""
    register_attention_functions()
    model.set_attn_implementation(implementation_name(attention))
