"""benchmarks/learn_niah.py: its recipe is valid and its no-mask ablation really crosses samples."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import torch
import yaml

from tests.builders import make_row
from trainer import collate, load_model


def _script():
    return importlib.import_module("benchmarks.learn_niah")


def test_the_recipe_is_valid(tmp_path: Path) -> None:
    from longdata.recipe import load_recipe

    learn_niah = _script()
    settings = learn_niah.Settings(out=str(tmp_path / "run"))
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(learn_niah.recipe(settings)))
    recipe = load_recipe(path)
    assert [s.count for s in recipe.sources] == [settings.items, settings.short_items]
    assert all(s.tasks == ("needle",) and s.needles == (1, 1) for s in recipe.sources)
    assert recipe.packing.max_seq_len == settings.row_tokens


def test_without_masks_later_samples_see_earlier_ones() -> None:
    learn_niah = _script()
    rng = np.random.default_rng(0)
    rows = [make_row([12, 20], rng, 512), make_row([8, 8, 16], rng, 512)]
    masked = collate(rows)
    crossed = learn_niah.attend_across_samples(masked)
    assert torch.equal(crossed["labels"], masked["labels"])
    assert crossed["position_ids"][0].tolist() == list(range(32))
    assert crossed["cu_seqlens"].tolist() == [0, 32, 64]
    model = load_model("tiny-llama", "sdpa_varlen", vocab_size=512, seed=0).eval()
    inputs = {k: v for k, v in masked.items() if k != "labels"}
    with torch.no_grad():
        apart = model(**inputs).logits
        together = model(**{k: v for k, v in crossed.items() if k != "labels"}).logits
    # The first sample of a row is the same either way; the ones after it are not.
    assert torch.allclose(apart[0, :12], together[0, :12], atol=1e-5)
    assert not torch.allclose(apart[0, 12:], together[0, 12:], atol=1e-3)
    assert not torch.allclose(apart[1, 8:], together[1, 8:], atol=1e-3)
