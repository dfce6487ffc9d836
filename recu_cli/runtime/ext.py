"""Build the C++ XNOR kernels on first use and load them from a per-user cache afterwards.

The library is compiled without -march (the kernels pick AVX-512 VPOPCNTDQ, AVX2 or scalar
code at run time), so one cached build is valid on any CPU of the machine's architecture.
The cache key covers the source, the flags, torch and Python, because a C++ extension is
tied to the exact torch ABI it was built against.

The ops are proper torch custom ops (TORCH_LIBRARY(recu_xnor) in csrc/xnor.cpp) with fake
(meta) kernels registered here, so torch.export and torch.compile trace them; an exported
program keeps `torch.ops.recu_xnor.*` nodes, and `import recu_cli.runtime` loads an
already-built library (`load_cached`, no compiler run) so such a program loads in a fresh
process.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from recu_cli.errors import RecuError

EXT_NAME = "recu_xnor"
SOURCE = Path(__file__).parent / "csrc" / "xnor.cpp"
# -ffp-contract=off: the epilogue must be a separate multiply and add (see csrc/xnor.cpp).
CFLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-ffp-contract=off", "-Wall"]
LDFLAGS = ["-fopenmp"]
ISA_NAMES = {0: "generic", 1: "avx2", 2: "avx512_vpopcntdq"}
ISA_CODES = {"auto": -1, **{v: k for k, v in ISA_NAMES.items()}}

_lock = threading.Lock()
_state: dict[str, Any] = {"ops": None, "error": None, "fakes": False}
LIBRARY_SUFFIXES = (".so", ".pyd", ".dylib")


def cache_root() -> Path:
    """RECU_EXT_DIR, else TORCH_EXTENSIONS_DIR/recu, else ~/.cache/recu/ext (XDG aware)."""
    if os.environ.get("RECU_EXT_DIR"):
        return Path(os.environ["RECU_EXT_DIR"])
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "recu"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "recu" / "ext"


def build_key() -> str:
    """Hash of everything the compiled library depends on."""
    h = hashlib.sha256(SOURCE.read_bytes())
    for part in (*CFLAGS, *LDFLAGS, torch.__version__, sys.version, platform.machine()):
        h.update(part.encode())
    return h.hexdigest()[:12]


def toolchain_problem() -> str | None:
    """Why a JIT build cannot even start, or None."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler found ('{cxx}' is not on PATH; install g++ or clang, or set CXX)"
    if not _import_cpp_extension().is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    return None


@contextlib.contextmanager
def quiet_cpp_extension_log() -> Iterator[None]:
    """Silence torch.utils.cpp_extension's 'No CUDA runtime' warning (CPU builds) on import."""
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _import_cpp_extension() -> Any:
    with quiet_cpp_extension_log():
        import torch.utils.cpp_extension as cpp

    return cpp


def _build() -> Any:
    problem = toolchain_problem()
    if problem is not None:
        raise RecuError(
            f"cannot build the xnor kernels: {problem}; use the int8 (or torch) engine instead",
            exit_code=1,
        )
    if not SOURCE.is_file():
        raise RecuError(f"xnor kernel source missing at {SOURCE}; reinstall recu", exit_code=1)
    cpp = _import_cpp_extension()
    key = build_key()
    build_dir = cache_root() / f"{EXT_NAME}-{key}"
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RecuError(
            f"cannot create the kernel cache folder {build_dir} ({e.strerror}); set RECU_EXT_DIR "
            "to a writable folder",
            exit_code=1,
        ) from e
    try:
        cpp.load(
            name=f"{EXT_NAME}_{key}",
            sources=[str(SOURCE)],
            extra_cflags=CFLAGS,
            extra_ldflags=LDFLAGS,
            build_directory=str(build_dir),
            with_cuda=False,
            is_python_module=False,
            verbose=bool(os.environ.get("RECU_EXT_VERBOSE")),
        )
    except Exception as e:  # noqa: BLE001 - compiler output is long; keep its last line
        last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise RecuError(
            f"building the xnor kernels failed ({last}); rerun with RECU_EXT_VERBOSE=1 to see "
            f"the compiler output, or use the int8 (or torch) engine instead",
            exit_code=1,
        ) from e
    register_fakes()
    return torch.ops.recu_xnor


def _out_hw(h: Any, w: Any, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int, dh: int,
            dw: int) -> tuple[Any, Any]:  # fmt: skip
    return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def _nhwc(x: torch.Tensor) -> bool:
    """The kernels' layout rule: channels_last-contiguous but not plain contiguous."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def register_fakes() -> None:
    """Shape-only (fake/meta) kernels of the C++ ops, once the library is loaded.

    They mirror the shapes, dtypes and memory formats the C++ kernels return, so that
    torch.export traces a runtime model into `recu_xnor::conv` nodes (checked by
    torch.library.opcheck in tests/test_export.py).
    """
    if _state["fakes"]:
        return
    reg = torch.library.register_fake

    @reg("recu_xnor::pack_activations")
    def _pack_activations(x: torch.Tensor, ph: int, pw: int, isa: int) -> torch.Tensor:
        n, c, h, w = x.shape
        return x.new_empty((n, h + 2 * ph, w + 2 * pw, (c + 63) // 64), dtype=torch.long)

    @reg("recu_xnor::pack_weights")
    def _pack_weights(w: torch.Tensor) -> torch.Tensor:
        cout, cin, kh, kw = w.shape
        return w.new_empty(((cout + 31) // 32, kh, kw, (cin + 63) // 64, 32), dtype=torch.long)

    @reg("recu_xnor::conv")
    def _conv(x: torch.Tensor, wpk: torch.Tensor, cout: int, kh: int, kw: int, sh: int,
              sw: int, ph: int, pw: int, dh: int, dw: int, *rest: Any) -> torch.Tensor:  # fmt: skip
        n, _, h, w = x.shape
        ho, wo = _out_hw(h, w, kh, kw, sh, sw, ph, pw, dh, dw)
        fmt = torch.channels_last if _nhwc(x) else torch.contiguous_format
        return torch.empty((n, cout, ho, wo), dtype=torch.float32, device=x.device,
                           memory_format=fmt)  # fmt: skip

    @reg("recu_xnor::bn_act_pool")
    def _bn_act_pool(x: torch.Tensor, *rest: Any, out: Any = None) -> torch.Tensor:
        pk, ps, pp = rest[6:9]
        if pk == 0:
            pk, ps, pp = 1, 1, 0
        n, c, h, w = x.shape
        ho, wo = _out_hw(h, w, pk, pk, ps, ps, pp, pp, 1, 1)
        return torch.empty((n, c, ho, wo), dtype=torch.float32, device=x.device,
                           memory_format=torch.channels_last)  # fmt: skip

    _state["fakes"] = True


def library_file(key: str | None = None) -> Path | None:
    """The built library of this source/torch/Python combination, if it is in the cache."""
    key = key or build_key()
    folder = cache_root() / f"{EXT_NAME}-{key}"
    for suffix in LIBRARY_SUFFIXES:
        f = folder / f"{EXT_NAME}_{key}{suffix}"
        if f.is_file():
            return f
    return None


def load_cached() -> bool:
    """Load an already-built library without running the compiler; True if the ops are there.

    Called by `import recu_cli.runtime`, so that torch.export.load finds recu_xnor ops in a
    fresh process. Never raises: without a cached build the kernels build on first use.
    """
    with _lock:
        if _state["ops"] is not None:
            return True
        try:
            lib = library_file()
            if lib is None:
                return False
            torch.ops.load_library(str(lib))
            register_fakes()
        except (OSError, RuntimeError):
            return False
        _state["ops"] = torch.ops.recu_xnor
        return True


def ops() -> Any:
    """The loaded op namespace (torch.ops.recu_xnor); builds once per process, else RecuError."""
    with _lock:
        if _state["ops"] is not None:
            return _state["ops"]
        if _state["error"] is not None:
            raise _state["error"]
        try:
            _state["ops"] = _build()
        except RecuError as e:
            _state["error"] = e
            raise
        return _state["ops"]


def isa_code(isa: str) -> int:
    """Map 'auto' / 'avx512_vpopcntdq' / 'avx2' / 'generic' to the kernel's code."""
    if isa not in ISA_CODES:
        raise RecuError(f"unknown xnor ISA {isa!r}; choose one of {', '.join(ISA_CODES)}")
    return ISA_CODES[isa]


def detected_isa() -> str:
    """The ISA the kernels use on this CPU when isa='auto'."""
    return ISA_NAMES[int(ops().detect_isa())]


def supported_isas() -> list[str]:
    """Every kernel variant this CPU can run (tests cover the fallbacks with these)."""
    o = ops()
    return [name for code, name in ISA_NAMES.items() if o.isa_supported(code)]
