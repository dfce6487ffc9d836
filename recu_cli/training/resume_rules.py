"""What `recu binarize --resume RUN` accepts besides the run folder.

A resumed run continues exactly, so every setting that would change its result is
refused (one line saying how to start a new run); a flag repeated with the run's own
value is accepted. What may change:

- how the run is executed: --workers, --device, --log-interval, --checkpoint-interval,
  --strict-data, --deterministic, --compile, --quiet, --json (the numbers do not depend
  on them on the CPU, except --compile, whose compiled kernels round differently; another
  kind of device, or switching --compile, continues correctly but not to the bit);
- its length: a larger --epochs or --max-steps. Schedule rule: the cosine learning rate
  and the tau schedule are recomputed for the new length and continue from the current
  step, as if the run had been started with the new length (steps already taken keep
  the values they had).

Accepted changes are written to config.json and train.log.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from recu_cli.errors import RecuError

# CLI parameter name -> TrainConfig field, for the settings --resume may change
EXECUTION = (
    "workers", "device", "log_interval", "checkpoint_interval", "strict_data", "deterministic",
    "compile",
)  # fmt: skip
LENGTH = ("epochs", "max_steps")
NOT_SETTINGS = ("resume", "json_out", "quiet")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-").removesuffix("-out")


def apply_resume_flags(
    cfg: Any, given: dict[str, Any], run_dir: str, done: Any
) -> tuple[Any, list[str]]:
    """Return (new config, human-readable changes) or raise for a refused flag.

    `given` maps the CLI parameter names the user typed to their values; `done` is the
    run's position (epoch, global_step) read from its resume point.
    """
    refused = [
        k
        for k in given
        if k not in EXECUTION + LENGTH + NOT_SETTINGS and not _same(cfg, k, given[k])
    ]
    if refused:
        names = ", ".join(flag(k) for k in refused)
        raise RecuError(
            f"--resume continues {run_dir} exactly with its saved settings; {names} would "
            "change the result: start a new run instead (same command without --resume, "
            "another --experiment name)"
        )
    changes: dict[str, Any] = {}
    for key in EXECUTION + LENGTH:
        if key in given and given[key] != getattr(cfg, key):
            changes[key] = given[key]
    if "epochs" in changes and changes["epochs"] < cfg.epochs:
        raise RecuError(
            f"--epochs {changes['epochs']} is less than the run's {cfg.epochs}; --resume can "
            "only make a run longer (start a new run for a shorter one)"
        )
    if "max_steps" in changes and not cfg.max_steps:
        raise RecuError(
            f"{run_dir} runs without a step limit; --max-steps would change its schedule: "
            "start a new run instead, or give a larger --epochs"
        )
    if "max_steps" in changes and changes["max_steps"] < cfg.max_steps:
        raise RecuError(
            f"--max-steps {changes['max_steps']} is less than the run's {cfg.max_steps}; "
            "--resume can only make a run longer"
        )
    if "max_steps" in changes and changes["max_steps"] <= done.global_step:
        raise RecuError(
            f"--max-steps {changes['max_steps']}: the run has already taken "
            f"{done.global_step} steps; give a larger number"
        )
    new = replace(cfg, **changes)
    notes = [f"{flag(k)} {getattr(cfg, k)} -> {v}" for k, v in changes.items()]
    return new, notes


def _same(cfg: Any, key: str, value: Any) -> bool:
    """A flag repeated with the run's own value changes nothing: accept it."""
    if not hasattr(cfg, key) or key in ("model", "data"):
        return False
    saved = getattr(cfg, key)
    if key in ("amp_dtype", "data_path") and value == "auto":  # config.json holds what
        return True  # auto resolved to
    if isinstance(value, Path):
        value = str(value.expanduser().resolve())
    return value == saved


def finished(cfg: Any, done: Any) -> bool:
    """True when the run has nothing left to do under `cfg`."""
    if cfg.max_steps and done.global_step >= cfg.max_steps:
        return True
    return done.epoch >= cfg.epochs
