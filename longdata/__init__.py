"""longdata: packed long-context fine-tuning datasets, built reproducibly and streamed to
training."""

__version__ = "0.1.0"
