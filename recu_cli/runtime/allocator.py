"""Keep freed tensor memory in the process for the next forward (glibc malloc settings).

glibc serves allocations above a threshold (32 MiB at most) with fresh mmap pages and
returns them to the OS on free, so a batch-16 ResNet-18 forward, whose stem output alone is
51 MB, page-faults through every large tensor on every call: measured here, that made the
runtime 2-3x slower at batch 16 (docs/performance.md). ONNX Runtime and OpenVINO keep their
own memory arenas; this gives recu's runtime the same footing. A CPU training step is
the same story with more tensors (every activation, its sign, their gradients), so
`recu binarize` sets it too (bench/train_step.py measures both settings). Process-wide, so
the CLI's commands set it, and library users opt in by calling `keep_freed_memory()`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


@functools.cache
def keep_freed_memory() -> bool:
    """Serve every allocation from the heap and never trim it; True where glibc took it."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False  # not glibc (musl, macOS, Windows): nothing to do
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
