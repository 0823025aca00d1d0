"""Resumable checkpoints that hold tensors and plain data only, so loading one runs no code.

A checkpoint is a directory `<out_dir>/checkpoints/step_<N>/` (seven digits) with:

- `state.pt`: trainable weights, optimizer and scheduler state and every rank's RNG state, all
  tensors, numbers, strings and lists/dicts of them, read back with
  `torch.load(weights_only=True)`: a pickle that names any other Python object is refused;
- `meta.json`: the step, the split being trained, the dataloader position (`RowLoader.state_dict`:
  plain numbers), the world size and the run's config.

Only directories with that name holding this trainer's `meta.json` format are ever read as the
newest checkpoint, replaced or pruned (`keep_checkpoints`).

The loop talks to one `Checkpointer`, which owns the run's checkpoints the way torchtitan's
CheckpointManager does: the lookup of the one `resume` names, the cadence (`checkpoint_every`),
the save, and the pruning to the newest `keep_checkpoints`.
"""

from __future__ import annotations

import json
import pickle
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from transformers import PreTrainedModel

from longdata.format.paths import NotOursError, claim_directory
from longdata.trainer.config import ConfigError, TrainConfig
from longdata.trainer.curriculum import Stage
from longdata.trainer.distributed import ParallelContext

CHECKPOINT_FORMAT = "longdata-trainer-checkpoint/1"
CHECKPOINT_NAME = re.compile(r"step_(\d{7})")
STATE_FILE = "state.pt"
META_FILE = "meta.json"


class CheckpointError(ConfigError):
    """A `--resume` path that is not a checkpoint this trainer can load safely."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (disk full, read-only, ...); earlier ones are intact."""

    exit_code = 1


def claim_run_dir(out_dir: str | Path, resuming: bool) -> Path:
    """`out_dir` ready for a run: new, empty, or a run directory longdata marked (never a build or
    a user's directory). One that holds checkpoints is refused unless the run resumes, so a later
    `--resume OUT` cannot pick up an earlier run's checkpoint as this run's."""
    out_dir = claim_directory(out_dir, "run")
    if _checkpoints(out_dir) and not resuming:
        raise NotOursError(
            f"--out {out_dir} holds checkpoints of an earlier run; pass --resume {out_dir} to "
            "continue it, or choose a new --out"
        )
    return out_dir


@dataclass(frozen=True)
class CheckpointMeta:
    step: int
    split: str  # the split the dataloader position belongs to
    dataloader: dict[str, Any]
    world_size: int


def checkpoint_dir(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"step_{step:07d}"


def read_meta(path: Path) -> CheckpointMeta:
    meta_file = path / META_FILE
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError, RecursionError):
        raise CheckpointError(
            f"{path}: no readable {META_FILE}; not a checkpoint of this trainer"
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{meta_file}: not a {CHECKPOINT_FORMAT} checkpoint")
    try:
        return CheckpointMeta(
            int(meta["step"]), str(meta["split"]), dict(meta["dataloader"]), int(meta["world_size"])
        )
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{meta_file}: missing or malformed step/split/dataloader") from None


def _is_ours(path: Path) -> bool:
    """A checkpoint directory this trainer wrote (by name and meta format), not a link."""
    if path.is_symlink() or not path.is_dir() or not CHECKPOINT_NAME.fullmatch(path.name):
        return False
    try:
        read_meta(path)
    except CheckpointError:
        return False
    return True


def _checkpoints(out_dir: Path) -> list[Path]:
    """This trainer's checkpoints in `<out_dir>/checkpoints`, oldest first."""
    root = out_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(path for path in root.iterdir() if _is_ours(path))


def find_checkpoint(path: str | Path) -> Path:
    """`path` itself if it is a checkpoint directory, else the newest checkpoint of the run
    directory `path`."""
    path = Path(path)
    if (path / META_FILE).is_file():
        read_meta(path)
        return path
    if (path / "checkpoints").is_dir():
        found = _checkpoints(path)
        if not found:
            raise CheckpointError(f"--resume {path}: no checkpoint in {path / 'checkpoints'}")
        return found[-1]
    raise CheckpointError(
        f"--resume {path}: neither a checkpoint directory (with {META_FILE}) nor a run "
        "directory (with checkpoints/)"
    )


# ---------------------------------------------------------------------------------------------
# State


def _full_state(
    model: PreTrainedModel, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Whole (unsharded) trainable weights and optimizer state, on CPU, keyed by name.

    A collective under FSDP (every rank must call it; the shards are gathered). Only trainable
    weights are kept: the frozen rest (LoRA's base) is rebuilt from the model spec and seed.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optimizer_state = get_state_dict(model, optimizer, options=options)
    return {k: v for k, v in model_state.items() if k in trainable}, optimizer_state


def _load_full_state(
    model: PreTrainedModel, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load `_full_state`'s output on every rank (FSDP keeps each rank's shard of it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
        options=StateDictOptions(full_state_dict=True, strict=False),
    )


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and numbers (what `weights_only` loads)."""
    python_version, python_keys, python_gauss = random.getstate()
    numpy_name, numpy_keys, numpy_pos, numpy_has_gauss, numpy_gauss = np.random.get_state()
    state = {
        "python_version": python_version,
        "python_keys": torch.tensor(python_keys, dtype=torch.int64),
        "python_gauss": python_gauss,
        "numpy_name": numpy_name,
        "numpy_keys": torch.from_numpy(numpy_keys.astype(np.int64)),
        "numpy_pos": int(numpy_pos),
        "numpy_has_gauss": int(numpy_has_gauss),
        "numpy_gauss": float(numpy_gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(
        (state["python_version"], tuple(state["python_keys"].tolist()), state["python_gauss"])
    )
    np.random.set_state(
        (
            state["numpy_name"],
            state["numpy_keys"].numpy().astype(np.uint32),
            state["numpy_pos"],
            state["numpy_has_gauss"],
            state["numpy_gauss"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _every_rank_rng(context: ParallelContext) -> list[dict[str, Any]]:
    """Every rank's RNG state, in rank order (a collective under torchrun)."""
    if not context.distributed:
        return [rng_state()]
    states: list[Any] = [None] * context.world_size
    dist.all_gather_object(states, rng_state())
    return states


# ---------------------------------------------------------------------------------------------
# Save, load, prune


def save_checkpoint(
    out_dir: Path,
    step: int,
    split: str,
    model: PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loader_state: dict[str, Any],
    config: TrainConfig,
    context: ParallelContext,
) -> Path:
    """Rank 0 writes `checkpoint_dir(out_dir, step)`; every rank must call this (gathering
    sharded weights and RNG states are collectives). The data position needs no gathering:
    the loader state counts the samples the whole world has consumed, which is the
    same number on every rank."""
    model_state, optimizer_state = _full_state(model, optimizer)
    rng_states = _every_rank_rng(context)
    path = checkpoint_dir(out_dir, step)
    if not context.is_main:
        return path
    partial = path.with_name(path.name + ".partial")
    if partial.is_dir() and not partial.is_symlink():
        shutil.rmtree(partial)  # our own leftover from a save that was killed
    state = {
        "model": model_state,
        "optimizer": optimizer_state,
        "scheduler": scheduler.state_dict(),
        "rng": rng_states,
    }
    meta = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "split": split,
        "dataloader": loader_state,
        "world_size": context.world_size,
        "config": asdict(config),
    }
    try:
        partial.mkdir(parents=True)
        torch.save(state, partial / STATE_FILE)
        (partial / META_FILE).write_text(json.dumps(meta, indent=2))
    except (OSError, RuntimeError) as error:  # torch reports a failed write as RuntimeError
        shutil.rmtree(partial, ignore_errors=True)
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointSaveError(
            f"saving checkpoint {path} failed ({reason}); the earlier checkpoints are intact"
        ) from None
    if _is_ours(path):
        shutil.rmtree(path)  # a step redone after resuming from an older checkpoint
    partial.replace(path)  # a kill mid-save leaves the previous checkpoints intact
    return path


def load_checkpoint(
    path: Path,
    model: PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    context: ParallelContext,
) -> CheckpointMeta:
    """Restore weights, optimizer, scheduler and this rank's RNG on every rank (the checkpoint
    must be readable by all of them); the dataloader position is in the returned meta."""
    meta = read_meta(path)
    if meta.world_size != context.world_size:
        raise CheckpointError(
            f"{path} was written by {meta.world_size} ranks; resume it with the same number "
            f"(this run has {context.world_size})"
        )
    state_file = path / STATE_FILE
    try:
        state = torch.load(state_file, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{state_file}: refused: it holds Python objects, not only tensors and plain data "
            "(not written by this trainer, or tampered with); nothing in it was run"
        ) from None
    except (OSError, RuntimeError, EOFError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"{state_file}: not a readable checkpoint ({reason})") from None
    try:
        _load_full_state(model, optimizer, state)
        scheduler.load_state_dict(state["scheduler"])
        restore_rng(state["rng"][context.rank])
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(
            f"{state_file}: malformed, or not a checkpoint of this model ({reason})"
        ) from None
    return meta


def prune_checkpoints(out_dir: Path, keep: int) -> list[Path]:
    """Remove all but the newest `keep` of this trainer's checkpoints in `<out_dir>/checkpoints`
    (anything else there is left alone); returns what was removed."""
    removed = _checkpoints(out_dir)[:-keep] if keep > 0 else []
    for path in removed:
        shutil.rmtree(path)
    return removed


# ---------------------------------------------------------------------------------------------
# The run's checkpointer


class LoaderPosition(Protocol):
    """Where the data stands: the split being trained and the dataloader's position in it."""

    split: str

    def position(self) -> dict[str, Any]: ...


class Checkpointer:
    """A run's checkpoints: which one it resumes from (`resume`), when it writes one (every
    `checkpoint_every` steps), and how many it keeps (`keep_checkpoints`).

    Built before anything is written, so a wrong `--resume` fails first; `restore` then names
    the weights, optimizer and schedule it saves from and loads the resumed state into them.
    """

    def __init__(self, config: TrainConfig, context: ParallelContext) -> None:
        self._config = config
        self._context = context
        self._out_dir = Path(config.out_dir)
        self.resume_from = find_checkpoint(config.resume) if config.resume else None
        self._resumed: CheckpointMeta | None = None
        self._model: PreTrainedModel | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._scheduler: torch.optim.lr_scheduler.LRScheduler | None = None

    def restore(
        self,
        model: PreTrainedModel,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
    ) -> int:
        """Keep these as what `save_if_due` saves; load the resume checkpoint into them (every
        rank). Returns the step the run continues after: the checkpoint's, or 0."""
        self._model, self._optimizer, self._scheduler = model, optimizer, scheduler
        if self.resume_from is None:
            return 0
        self._resumed = load_checkpoint(
            self.resume_from, model, optimizer, scheduler, self._context
        )
        return self._resumed.step

    def loader_position(self, stage: Stage) -> dict[str, Any] | None:
        """The dataloader position `stage` starts from: the checkpoint's if it was taken in that
        stage, else None (the stage starts from its beginning)."""
        resumed = self._resumed
        if resumed is None or stage.first_step > resumed.step:
            return None
        if resumed.split != stage.split:
            raise CheckpointError(
                f"{self.resume_from} was training split {resumed.split} at step {resumed.step}, "
                f"but this run's step {resumed.step} trains {stage.split}: resume with the same "
                "split, steps and stage_steps"
            )
        return resumed.dataloader

    def due(self, step: int) -> bool:
        """Whether `step` is on the `checkpoint_every` cadence (never when it is 0)."""
        every = self._config.checkpoint_every
        return bool(every) and step % every == 0

    def save_if_due(self, step: int, data: LoaderPosition) -> Path | None:
        """After `step`: on the cadence, save (every rank must call this: saving gathers), then
        prune to the newest `keep_checkpoints` (rank 0). Returns the checkpoint written."""
        if not self.due(step):
            return None
        path = save_checkpoint(
            self._out_dir,
            step,
            data.split,
            self._model,
            self._optimizer,
            self._scheduler,
            data.position(),
            self._config,
            self._context,
        )
        if self._context.is_main:
            prune_checkpoints(self._out_dir, self._config.keep_checkpoints)
        return path
