"""The tau schedule: which quantile of the weight distribution ReCU clamps at."""

from __future__ import annotations

import math

TAU_MIN = 0.85
TAU_MAX = 0.99


def tau_schedule(
    epoch: float, epochs: int, tau_min: float = TAU_MIN, tau_max: float = TAU_MAX
) -> float:
    """The paper's exponential schedule tau(e) = A * exp(e / E) + B.

    A = (tau_max - tau_min) / (e - 1), B = tau_min - A, so tau(0) = tau_min and tau(E) =
    tau_max. `epoch` is 0-based and may be fractional (per-step updates).
    """
    if epochs <= 0:
        raise ValueError("epochs must be positive")
    a = (tau_max - tau_min) / (math.e - 1.0)
    b = tau_min - a
    return a * math.exp(epoch / epochs) + b
