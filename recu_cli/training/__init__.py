"""Fine-tuning a converted model: plain PyTorch, resumable to the bit, DDP under torchrun.

The one front door of training: `from recu_cli.training import Trainer, TrainConfig`.
Names are loaded on first use (PEP 562), so importing a light submodule such as
`training.config` for the command line's options does not import torch.

config.py (TrainConfig), settings.py (the command's arguments -> TrainConfig),
run_folder.py (the run's files and lock, from plain values), parts.py (model, teacher,
data, optimizer), state.py (position and resume state), optim.py (groups, schedules,
stage bounds), steps.py (a step, a validation, an epoch's row), loop.py (the epoch loop,
stages, epoch ends), trainer.py (all of it); distill.py, sampling.py, step_metrics.py,
distributed.py, resume_rules.py, resumeclock.py, runlock.py serve them.
"""

from __future__ import annotations

from recu_cli.lazy import lazy_names

_EXPORTS = {
    "OPTIMIZERS": "config",
    "TrainConfig": "config",
    "SYNC_STEPS": "loop",
    "build_optimizer": "optim",
    "build_scheduler": "optim",
    "param_groups": "optim",
    "stage_bounds": "optim",
    "stage_of": "optim",
    "SUMMARY_FIELDS": "run_folder",
    "check_world_size": "run_folder",
    "load_run_config": "run_folder",
    "read_position": "run_folder",
    "Position": "state",
    "TrainingStopped": "state",
    "FlipTracker": "trackers",
    "SkippedImages": "trackers",
    "weights_digest": "trackers",
    "Trainer": "trainer",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_names(__name__, _EXPORTS)
