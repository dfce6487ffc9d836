"""When to write a resume point inside an epoch (`--checkpoint-interval`).

On ImageNet an epoch takes hours; a kill should cost minutes, not the epoch. The
interval is a number of optimizer steps ("500") or a time ("10m", "90s", "1h"); "0"
writes resume points only at the start of training and at epoch ends.
"""

from __future__ import annotations

import re
import time

from recu_cli.errors import RecuError

DEFAULT_INTERVAL = "10m"
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_interval(text: str) -> tuple[int | None, float | None]:
    """(steps, seconds): exactly one is set, or both None for "0" (off)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(text))
    if m is None or (not m.group(2) and "." in m.group(1)):
        raise RecuError(
            f"--checkpoint-interval must be a number of steps (500) or a time (10m, 90s, 1h), "
            f"got '{text}'"
        )
    value, unit = float(m.group(1)), m.group(2)
    if value == 0:
        return None, None
    if unit:
        return None, value * _UNITS[unit]
    return int(value), None


class ResumeClock:
    """Says when the next resume point is due; `reset()` after each one written."""

    def __init__(self, interval: str) -> None:
        self.steps, self.seconds = parse_interval(interval)
        self.reset()

    def reset(self) -> None:
        self._since = time.monotonic()

    def due(self, global_step: int) -> bool:
        if self.steps is not None:
            return global_step % self.steps == 0
        if self.seconds is not None:
            return time.monotonic() - self._since >= self.seconds
        return False
