"""What `recu binarize --resume RUN` accepts besides the run folder.

A resumed run continues exactly, so every setting that would change its result is
refused (one line saying how to start a new run); a flag repeated with the run's own
value is accepted. What may change:

- how the run is executed: --workers, --device, --log-interval, --checkpoint-interval,
  --strict-data, --deterministic, --quiet, --json (the numbers do not depend on them on
  the CPU; another kind of device continues correctly but not to the bit);
- its length: a larger --epochs or --max-steps. Schedule rule: the cosine learning rate
  and the tau schedule are recomputed for the new length and continue from the current
  step, as if the run had been started with the new length (steps already taken keep
  the values they had).

Which is which is declared with each setting (`resume=` in TrainConfig's fields:
EXECUTION, LONGER, else FIXED); a flag that sets a nested conversion field (--act,
--plain-sign, ...) is compared with the run's `convert` fields. Accepted changes are
written to config.json and train.log.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from recu_cli.errors import RecuError
from recu_cli.setting import FIXED, LONGER, Declared, by_param, check_value, declared


def apply_resume_flags(
    cfg: Any, given: dict[str, Any], run_dir: str, done: Any
) -> tuple[Any, list[str]]:
    """Return (new config, human-readable changes) or raise for a refused flag.

    `given` maps the command parameters the user typed (other than --resume, --json,
    --quiet) to their values; `done` is the run's position (epoch, global_step) read from
    its resume point. Each flag is checked by its declaration and compared field by field,
    nested conversion fields included, with what the run holds.
    """
    flags = by_param(type(cfg))
    table = declared(type(cfg))
    refused: list[str] = []
    changes: dict[str, Any] = {}
    for param, value in given.items():
        if param not in flags:  # --config: the run's settings are its config.json
            refused.append("--" + param.replace("_", "-"))
            continue
        d = flags[param]
        for key, v in d.from_flag(_plain(value)).items():
            v = check_value(table[key], v)
            if _same(table[key], v, _get(cfg, key)):
                continue
            if table[key].setting.resume == FIXED:
                refused.append(d.flag)
                break
            changes[key] = v
    if refused:
        names = ", ".join(dict.fromkeys(refused))
        raise RecuError(
            f"--resume continues {run_dir} exactly with its saved settings; {names} would "
            "change the result: start a new run instead (same command without --resume, "
            "another --experiment name)"
        )
    _check_longer(cfg, {k: v for k, v in changes.items() if table[k].setting.resume == LONGER},
                  run_dir, done)  # fmt: skip
    new = replace(cfg, **changes)
    notes = [f"{table[k].flag} {getattr(cfg, k)} -> {v}" for k, v in changes.items()]
    return new, notes


def _check_longer(cfg: Any, longer: dict[str, Any], run_dir: str, done: Any) -> None:
    """--epochs and --max-steps may only grow (the schedule rule in the docstring)."""
    if "epochs" in longer and longer["epochs"] < cfg.epochs:
        raise RecuError(
            f"--epochs {longer['epochs']} is less than the run's {cfg.epochs}; --resume can "
            "only make a run longer (start a new run for a shorter one)"
        )
    if "max_steps" not in longer:
        return
    steps = longer["max_steps"]
    if not cfg.max_steps:
        raise RecuError(
            f"{run_dir} runs without a step limit; --max-steps would change its schedule: "
            "start a new run instead, or give a larger --epochs"
        )
    if steps < cfg.max_steps:
        raise RecuError(
            f"--max-steps {steps} is less than the run's {cfg.max_steps}; "
            "--resume can only make a run longer"
        )
    if steps <= done.global_step:
        raise RecuError(
            f"--max-steps {steps}: the run has already taken {done.global_step} steps; "
            "give a larger number"
        )


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _plain(value: Any) -> Any:
    """A path as the run stores it (absolute), a list as a tuple."""
    if hasattr(value, "__fspath__"):
        return str(value.expanduser().resolve())
    return tuple(value) if isinstance(value, list) else value


def _same(d: Declared, value: Any, saved: Any) -> bool:
    """A flag repeated with the run's own value changes nothing: accept it. A value
    resolved when the run started (--amp-dtype auto) is the run's own, too."""
    return value == saved or value in d.setting.auto


def finished(cfg: Any, done: Any) -> bool:
    """True when the run has nothing left to do under `cfg`."""
    if cfg.max_steps and done.global_step >= cfg.max_steps:
        return True
    return done.epoch >= cfg.epochs
