"""Where step metrics go: `<out_dir>/metrics.jsonl` always, TensorBoard and W&B when asked.

A resumed run first cuts `metrics.jsonl` back to the steps up to its checkpoint, so every step
appears once however often the run was killed and resumed (TensorBoard likewise purges the
events after that step).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from longdata.trainer.config import ConfigError, TrainConfig

METRICS_FILE = "metrics.jsonl"


def keep_steps_up_to(path: Path, step: int) -> None:
    """Drop the lines of a metrics file whose step is after `step` (a killed run's tail)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError, RecursionError):
            break  # a line cut short by a kill: nothing after it was written whole
    path.write_text("".join(f"{line}\n" for line in kept))


def _scalars(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a metrics record, nested keys joined by '/' (`loss_per_source/x`)."""
    flat: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_scalars(value, f"{name}/"))
        elif isinstance(value, int | float) and not isinstance(value, bool) and key != "step":
            flat[name] = float(value)
    return flat


class MetricsLog:
    """Rank 0's metric writers; a disabled log (other ranks) writes nothing."""

    def __init__(self, config: TrainConfig, start_step: int, enabled: bool) -> None:
        self._jsonl = None
        self._tensorboard = None
        self._wandb = None
        if not enabled:
            return
        out_dir = Path(config.out_dir)
        metrics = out_dir / METRICS_FILE
        keep_steps_up_to(metrics, start_step)
        if "tensorboard" in config.report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError(
                    "report_to tensorboard needs the tensorboard package (pip install tensorboard)"
                ) from None
            self._tensorboard = SummaryWriter(
                log_dir=str(out_dir / "tensorboard"), purge_step=start_step + 1
            )
        if "wandb" in config.report_to:
            try:
                import wandb
            except ImportError:
                raise ConfigError(
                    "report_to wandb needs the wandb package (pip install wandb)"
                ) from None
            from dataclasses import asdict

            # Project, entity and mode (e.g. WANDB_MODE=offline) come from wandb's environment.
            self._wandb = wandb.init(dir=str(out_dir), name=out_dir.name, config=asdict(config))
        self._jsonl = metrics.open("a")

    def write(self, record: dict[str, Any]) -> None:
        if self._jsonl is None:
            return
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        scalars = _scalars(record)
        if self._tensorboard is not None:
            for name, value in scalars.items():
                self._tensorboard.add_scalar(name, value, record["step"])
            self._tensorboard.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=record["step"])

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()
