"""Package names loaded on first use (PEP 562): a package's front door can list what
needs torch without importing it, so `recu --help` and the torch-free readers stay fast."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from typing import Any


def lazy_names(
    package: str, homes: dict[str, str], modules: Iterable[str] = ()
) -> Callable[[str], Any]:
    """A module `__getattr__` for `package`: each name of `homes` from its submodule, and
    each of `modules` as the submodule itself, imported when first asked for."""
    submodules = frozenset(modules)

    def __getattr__(name: str) -> Any:
        if name in submodules:
            return importlib.import_module(f"{package}.{name}")
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{home}"), name)

    return __getattr__
