"""`longdata eval loss`: validation loss of a checkpoint on a build's split, as a JSON report.

The loss itself is the trainer's (`trainer.validation_loss`: rows run packed exactly as in
training); this module picks the split, loads the model and assembles the report.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from longdata.evals.models import EvalInputError, load_eval_model


class NothingToEvaluate(RuntimeError):
    """The build has no rows to evaluate (no validation split, or an empty one)."""


@dataclass
class LossRun:
    split: str
    note: str | None  # which split was picked by default, and the others the build has
    report: Any  # trainer.validation_loss.LossReport
    result: dict[str, Any]  # the JSON report
    seconds: float


def pick_split(manifest: Any, split: str | None) -> tuple[str, str | None]:
    """`split`, or the default validation split with a note naming the others (stage order)."""
    from longdata.format import UnknownSplitError
    from longdata.trainer.validation_loss import default_split

    if split is not None:
        try:
            manifest.split(split)
        except UnknownSplitError as error:
            raise EvalInputError("--split", str(error)) from None
        return split, None
    chosen = default_split(manifest)
    if chosen is None:
        raise NothingToEvaluate(
            f"{manifest.build_dir} has no validation split (the recipe's validation held out "
            "nothing, e.g. validation.fraction: 0 or too few samples); pass --split with one "
            f"of: {', '.join(manifest.split_names)}"
        )
    others = [s for s in manifest.validation_splits() if s != chosen]
    note = f"split: {chosen}" + (f" (also in the build: {', '.join(others)})" if others else "")
    return chosen, note


def run_loss(
    build: str | Path,
    model: str,
    *,
    split: str | None = None,
    batch_size: int = 1,
    attention: str = "auto",
    dtype: str = "auto",
    device: str = "auto",
    on_split: Callable[[str, str | None, int], Callable[[int], None]] = lambda *_: lambda n: None,
) -> LossRun:
    """Validation loss of `model` on `split` of `build`. `on_split(split, note, rows)` hears the
    chosen split before the model runs and returns a callback told of each batch's rows."""
    from longdata.trainer.data import Manifest
    from longdata.trainer.validation_loss import evaluate_loss, split_rows

    started = time.perf_counter()
    try:
        manifest = Manifest.read(build)
    except (FileNotFoundError, ValueError) as error:
        raise EvalInputError("BUILD", str(error)) from None
    split, note = pick_split(manifest, split)
    rows = split_rows(manifest, split)
    if rows == 0:
        raise NothingToEvaluate(f"split {split} of {build} has no rows: nothing to evaluate")
    lm, device_name, dtype_name = load_eval_model(model, attention, device, dtype)
    vocab = lm.get_input_embeddings().num_embeddings
    if vocab < manifest.vocab_size:
        raise EvalInputError(
            "--model",
            f"the model's embedding has {vocab} tokens but the build's tokenizer has "
            f"{manifest.vocab_size}: not a model for this build",
        )
    on_rows = on_split(split, note, rows)
    report = evaluate_loss(lm, manifest, split, batch_size=batch_size, on_rows=on_rows)
    seconds = time.perf_counter() - started
    result = {
        "build": str(build),
        "model": model,
        "attention": attention,
        "dtype": dtype_name,
        "device": device_name,
        "seconds": round(seconds, 2),
        **report.as_dict(),
    }
    return LossRun(split, note, report, result, seconds)
