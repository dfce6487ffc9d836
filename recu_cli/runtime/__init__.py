"""Fast inference of binary convs: XNOR-popcount C++ kernels and a +-1 int8 GEMM engine.

Public API (stable names, used by `recu bench` and `recu eval --runtime`):
    ENGINES, available(engine), fast_conv(layer, engine, bn=None), to_runtime(model, engine)
"""

from __future__ import annotations

from recu_cli.runtime.api import ENGINES, available, fast_conv, to_runtime

__all__ = ["ENGINES", "available", "fast_conv", "to_runtime"]
