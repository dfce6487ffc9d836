"""A number of the training step that changes between steps: a loss weight, a penalty's share.

A compiled or CUDA-graph-captured step that read a Python float would bake it in (a
recompile, or a stale value, each time it moves); one that reads a 0-dim device tensor
sees the new value from the same graph. The host mirror lets eager code skip a term that
is 0 without reading the device back.
"""

from __future__ import annotations

import torch


class DeviceScalar:
    """A 0-dim float32 tensor on the training device and its host mirror `value`."""

    def __init__(self, value: float, device: torch.device) -> None:
        self.value = float(value)
        self.tensor = torch.tensor(self.value, dtype=torch.float32, device=device)

    def set(self, value: float) -> None:
        """In place (a captured step keeps reading the same buffer), only where it changes."""
        if float(value) != self.value:
            self.value = float(value)
            self.tensor.fill_(self.value)
