"""Loading the model an eval scores: a trained checkpoint or a hub id, on a device and dtype."""

from __future__ import annotations

from typing import Any

DTYPES = ("auto", "fp32", "bf16", "fp16")


class EvalInputError(ValueError):
    """Input the user must fix; `option` names the command-line option it came from."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(message)
        self.option = option


def resolve_device_and_dtype(device: str, dtype: str) -> tuple[Any, Any, str]:
    """(torch.device, torch dtype, dtype name) for `--device` / `--dtype` values.

    `auto` device: cuda if available, else cpu. `auto` dtype: bf16 on a GPU that has it, else
    fp32.
    """
    import torch

    if dtype not in DTYPES:
        raise EvalInputError("--dtype", f"choose one of {', '.join(DTYPES)}, not {dtype!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise EvalInputError("--device", str(error)) from None
    if dtype == "auto":
        use_bf16 = resolved.type == "cuda" and torch.cuda.is_bf16_supported()
        dtype = "bf16" if use_bf16 else "fp32"
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    return resolved, torch_dtype, dtype


def load_eval_model(model: str, attention: str, device: str, dtype: str) -> tuple[Any, str, str]:
    """(model in eval mode, device name, dtype name). Presets are refused: a random init has
    nothing to evaluate."""
    from longdata.trainer.model import PRESETS, load_model

    if model in PRESETS:
        raise EvalInputError(
            "--model",
            f"{model} is a random-init preset; evaluate a trained checkpoint (e.g. OUT/final "
            "from `longdata train`) or a hub id",
        )
    torch_device, torch_dtype, dtype_name = resolve_device_and_dtype(device, dtype)
    try:
        lm = load_model(model, attention, dtype=torch_dtype, device=torch_device)
    except (OSError, ValueError) as error:
        raise EvalInputError("--model", f"cannot load {model}: {error}") from None
    lm.eval()
    return lm, str(torch_device), dtype_name
