"""Refuse model and tokenizer directories that ask to run their own Python code.

A Hugging Face directory whose config.json or tokenizer_config.json has an ``auto_map`` names
classes in .py files shipped beside it; loading it means importing those files. longdata never
runs such code: every ``from_pretrained`` passes ``trust_remote_code=False`` (which also keeps
transformers from asking on stdin), and ``refuse_remote_code`` says so in one line before
transformers is even called, for the builder, the trainer and the evals alike.
"""

from __future__ import annotations

import json
from pathlib import Path

CONFIG_FILES = ("config.json", "tokenizer_config.json")


class RemoteCodeRefused(ValueError):
    """A model or tokenizer directory that needs its own Python code to load."""


def refuse_remote_code(where: str | Path) -> None:
    """Raise `RemoteCodeRefused` if the local directory `where` declares custom code.

    A hub id is not a directory here; transformers refuses its custom code itself because every
    load passes ``trust_remote_code=False``.
    """
    directory = Path(where)
    if not directory.is_dir():
        return
    for name in CONFIG_FILES:
        path = directory / name
        if not path.is_file():
            continue
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue  # not ours to judge here: transformers reports an unreadable config
        if isinstance(config, dict) and "auto_map" in config:
            raise RemoteCodeRefused(
                f"{where} asks to run its own Python code (auto_map in {name}); "
                "longdata never runs remote code"
            )
