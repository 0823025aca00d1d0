"""The bundled trainer: streams longdata shards and trains without cross-sample attention."""

from trainer.collate import collate
from trainer.model import load_model

__all__ = ["collate", "load_model"]
