"""Which split each step trains on: one split, or a staged build's training splits in order.

Llama 3.1 extended its context in stages (short rows first, then longer); a staged longdata
build has one training split per stage (`<stage>/train`). With no `split` set, a run trains
them in stage order with one optimizer and one learning-rate schedule across all of them; each
stage gets its share of the steps by its tokens, or the steps given in `stage_steps`.
"""

from __future__ import annotations

from dataclasses import dataclass

from longdata.format import parse_split_name, split_name
from longdata.trainer.config import ConfigError, TrainConfig
from longdata.trainer.data import Manifest
from longdata.trainer.validation_loss import default_split


@dataclass(frozen=True)
class Stage:
    split: str
    first_step: int  # 1-based, inclusive
    last_step: int  # inclusive

    @property
    def steps(self) -> int:
        return self.last_step - self.first_step + 1


def share_steps(weights: list[int], steps: int) -> list[int]:
    """`steps` shared in proportion to `weights` (largest remainder), every stage with a
    positive weight getting at least one."""
    positive = sum(1 for weight in weights if weight > 0)
    if positive == 0:
        raise ConfigError("no training split has any tokens")
    if steps < positive:
        raise ConfigError(f"steps ({steps}) is fewer than the {positive} curriculum stages")
    total = sum(weights)
    quotas = [steps * weight / total for weight in weights]
    shares = [int(quota) for quota in quotas]
    by_remainder = sorted(range(len(weights)), key=lambda i: (shares[i] - quotas[i], i))
    for index in by_remainder[: steps - sum(shares)]:
        shares[index] += 1
    for index, weight in enumerate(weights):
        if weight > 0 and shares[index] == 0:
            shares[index] = 1
            shares[max(range(len(shares)), key=lambda i: shares[i])] -= 1
    return shares


def _split_tokens(manifest: Manifest, split: str) -> int:
    return sum(stream.tokens for stream in manifest.split(split).streams)


def _check_split(manifest: Manifest, split: str, setting: str) -> None:
    if split not in manifest.splits:
        raise ConfigError(
            f"{setting} {split!r} is not in {manifest.build_dir}; its splits: "
            f"{', '.join(manifest.split_names)}"
        )


def plan_stages(manifest: Manifest, config: TrainConfig) -> list[Stage]:
    """The run's stages in order, covering steps 1..config.steps."""
    if config.split is not None:
        _check_split(manifest, config.split, "split")
        splits = [config.split]
        steps = [config.steps]
    else:
        splits = manifest.training_splits()
        if not splits:
            raise ConfigError(
                f"{manifest.build_dir} has no training split (train or <stage>/train); its "
                f"splits: {', '.join(manifest.split_names)}; pass --split"
            )
        if config.stage_steps is not None:
            if len(config.stage_steps) != len(splits):
                raise ConfigError(
                    f"stage_steps has {len(config.stage_steps)} entries but the build has "
                    f"{len(splits)} training splits: {', '.join(splits)}"
                )
            steps = list(config.stage_steps)
        else:
            steps = share_steps([_split_tokens(manifest, split) for split in splits], config.steps)
    if config.eval_split is not None:
        _check_split(manifest, config.eval_split, "eval_split")
    stages, last = [], 0
    for split, count in zip(splits, steps, strict=True):
        if count > 0:
            stages.append(Stage(split, last + 1, last + count))
            last += count
    return stages


def validation_split(manifest: Manifest, config: TrainConfig, train_split: str) -> str | None:
    """What `eval_every` evaluates while `train_split` trains: `eval_split`, else the stage's
    own validation split (`ctx16k/train` -> `ctx16k/validation`), else the build's default."""
    if config.eval_split is not None:
        return config.eval_split
    stage, _ = parse_split_name(train_split)
    own = split_name(stage, "validation")
    return own if own in manifest.splits else default_split(manifest)
