"""Where a run is and what it has measured: everything resume.pt holds besides the parts,
and the two directions between it and the file (resuming from it reproduces the
uninterrupted run to the bit)."""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from recu_cli.errors import RecuError
from recu_cli.training.distributed import DistInfo
from recu_cli.training.resumeclock import ResumeClock
from recu_cli.training.step_metrics import StepMetrics
from recu_cli.training.trackers import FlipTracker, SkippedImages


class TrainingStopped(RecuError):
    pass


@dataclass
class Position:
    """Where a run is: resuming from here reproduces the uninterrupted run exactly."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_top1: float = -1.0


@dataclass
class TrainState:
    """What changes as training goes: saved in resume.pt, except the stage's scheduler,
    which is rebuilt from the position."""

    metrics: StepMetrics  # this epoch's training loss, on the device
    clock: ResumeClock
    pos: Position = field(default_factory=Position)
    history: list[dict[str, Any]] = field(default_factory=list)
    flips: FlipTracker = field(default_factory=FlipTracker)
    skipped: SkippedImages = field(default_factory=SkippedImages)
    step0: dict[str, Any] | None = None
    stage: int = 2
    scheduler: Any = None
    # the global step at which the current stage began: (stage, step), saved in resume.pt.
    # first epoch * steps per epoch, unless an epoch before it was cut by --max-steps
    stage_start: tuple[int, int] | None = None
    stop_agreed: bool = False  # all ranks agreed at a sync point to stop at the next step


def resume_state(
    state: TrainState, info: DistInfo, epoch_loss: torch.Tensor, device: torch.device
) -> dict[str, Any]:
    """What resume.pt holds of the run's state; the caller adds the parts' state dicts
    (`Parts.state_dicts`)."""
    saved = {
        "position": asdict(state.pos),
        "history": json.dumps(state.history),
        "epoch_loss": epoch_loss,  # [world_size, 2]: each rank's own loss sum and count
        "world_size": info.world_size,
        "flips": state.flips.state(),
        "rng_torch": torch.get_rng_state(),
        "rng_python": json.dumps(random.getstate()),
        "step0": json.dumps(state.step0),
        "skipped": json.dumps(state.skipped.state()),
    }
    if state.stage_start is not None:
        saved["stage_start"] = json.dumps(list(state.stage_start))
    if device.type == "cuda":  # the ranks' generators advance alike: rank 0's serves
        saved["rng_cuda"] = torch.cuda.get_rng_state(device)
    return saved


def restore(saved: dict[str, Any], state: TrainState, info: DistInfo, device: torch.device) -> None:
    """Position, history, trackers and random generators from a resume point (the model,
    optimizer and scaler are loaded first, where a damaged file is caught)."""
    state.pos = Position(**saved["position"])
    state.history = json.loads(saved["history"])
    state.metrics.load(saved["epoch_loss"], info)
    state.flips.load(saved["flips"], device)
    state.step0 = json.loads(saved["step0"]) if "step0" in saved else None
    if "skipped" in saved:
        state.skipped.load(json.loads(saved["skipped"]))
    if "stage_start" in saved:  # absent in files from before it: the epoch formula holds
        stage, step = json.loads(saved["stage_start"])
        state.stage_start = (int(stage), int(step))
    torch.set_rng_state(saved["rng_torch"])
    if "rng_cuda" in saved and device.type == "cuda":
        torch.cuda.set_rng_state(saved["rng_cuda"], device)
    py = json.loads(saved["rng_python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
