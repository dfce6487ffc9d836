"""What the CPU offers the engines, logged next to every benchmark (docs/method.md section 7)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

FLAGS = ("avx512_vpopcntdq", "avx512_vnni", "amx_int8")


def _cpuinfo() -> tuple[str, set[str]]:
    """(model name, flag set) from /proc/cpuinfo; empty where it does not exist."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), set()
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return model or platform.machine(), flags


def cpu_report() -> dict[str, object]:
    """CPU model, the flags that matter to the engines, torch's build and thread setup."""
    model, flags = _cpuinfo()
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "flags": {f: f in flags for f in FLAGS},
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "load_average": load,
    }
