"""The bundled trainer: streams longdata shards and trains without cross-sample attention.

Exports are resolved lazily so `trainer.cli` (and `longdata --help`) import without torch.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "collate": "longdata.trainer.collation",
    "load_model": "longdata.trainer.model",
    "train": "longdata.trainer.loop",
    "TrainConfig": "longdata.trainer.config",
    "TrainResult": "longdata.trainer.loop",
    "check_backends": "longdata.trainer.check",
    "max_packing_error": "longdata.trainer.check",
}

__all__ = [
    "TrainConfig",
    "TrainResult",
    "check_backends",
    "collate",
    "load_model",
    "max_packing_error",
    "train",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'trainer' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
