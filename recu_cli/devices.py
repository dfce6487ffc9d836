"""Which device to run on: the user's choice, checked, or CUDA when present."""

from __future__ import annotations

import torch

from recu_cli.errors import RecuError


def pick_device(device: str | None) -> torch.device:
    """--device as given (checked), else cuda when available, else cpu."""
    if device:
        try:
            dev = torch.device(device)
        except RuntimeError as e:
            raise RecuError(f"bad --device '{device}'; use cpu, cuda or cuda:N") from e
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RecuError("--device cuda given but no CUDA GPU is available; use --device cpu")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
