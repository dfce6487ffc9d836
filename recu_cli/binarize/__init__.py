"""ReCU binarization: sign functions, layers and the tau schedule.

The names load on first use: `recu_cli.binarize.tau` (plain Python) is read by the
command line's defaults, which must not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "sign_pos": "functions",
    "BinaryConv2d": "layers",
    "ReCUConv2d": "layers",
    "recu_threshold": "layers",
    "tau_schedule": "tau",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
