"""ReCU binarization: sign functions, layers and the tau schedule.

The names load on first use: `recu_cli.binarize.tau` (plain Python) is read by the
command line's defaults, which must not pay for importing torch.
"""

from __future__ import annotations

from recu_cli.lazy import lazy_names

_HOMES = {
    "sign_pos": "functions",
    "BinaryConv2d": "layers",
    "ReCUConv2d": "layers",
    "recu_threshold": "layers",
    "tau_schedule": "tau",
}
__all__ = sorted(_HOMES)


__getattr__ = lazy_names(__name__, _HOMES)
