"""Fast inference of binary convs: XNOR-popcount C++ kernels and a +-1 int8 GEMM engine.

Public API (stable names, used by `recu bench` and `recu eval --runtime`):
    ENGINES, available(engine), fast_conv(layer, engine, bn=None), to_runtime(model, engine),
    keep_freed_memory() (the allocator setting the CLI uses for speed, allocator.py)
Importing this package also loads a cached build of the xnor kernels, if there is one
(see ext.load_cached), so that `torch.export.load` of a pt2 export works after it.
"""

from __future__ import annotations

from recu_cli.runtime import ext
from recu_cli.runtime.allocator import keep_freed_memory
from recu_cli.runtime.api import ENGINES, available, fast_conv, to_runtime

# An already-built xnor library is loaded now (a dlopen, no compiler), so that programs
# exported with `recu export --format pt2` (torch.ops.recu_xnor nodes) load in any process
# that has imported recu_cli.runtime.
ext.load_cached()

__all__ = ["ENGINES", "available", "fast_conv", "keep_freed_memory", "to_runtime"]
