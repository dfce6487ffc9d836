"""The names of recu's training that other modules and scripts import (recu_cli/training)."""

from __future__ import annotations

from recu_cli.step0 import describe_step0
from recu_cli.training.config import OPTIMIZERS, TrainConfig
from recu_cli.training.loop import SYNC_STEPS
from recu_cli.training.optim import (
    build_optimizer,
    build_scheduler,
    param_groups,
    stage_bounds,
    stage_of,
)
from recu_cli.training.run_folder import (
    SUMMARY_FIELDS,
    check_world_size,
    load_run_config,
    read_position,
)
from recu_cli.training.state import Position, TrainingStopped
from recu_cli.training.trackers import FlipTracker, SkippedImages, weights_digest
from recu_cli.training.trainer import Trainer

__all__ = [
    "OPTIMIZERS", "SUMMARY_FIELDS", "SYNC_STEPS", "FlipTracker", "Position", "SkippedImages",
    "TrainConfig", "Trainer", "TrainingStopped", "build_optimizer", "build_scheduler",
    "check_world_size", "describe_step0", "load_run_config", "param_groups", "read_position",
    "stage_bounds", "stage_of", "weights_digest",
]  # fmt: skip
