"""Deprecated: import from `recu_cli.training` (the one front door of training)."""

from __future__ import annotations

import warnings

from recu_cli.training import *  # noqa: F403
from recu_cli.training import __all__  # noqa: F401

warnings.warn(
    "recu_cli.train is deprecated; import from recu_cli.training",
    DeprecationWarning,
    stacklevel=2,
)
