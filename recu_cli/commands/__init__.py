"""One module per command; each registers itself on recu_cli.app.app when imported."""

from __future__ import annotations

import importlib

COMMAND_MODULES = ("convert", "evaluate", "binarize", "analyze", "info", "bench", "export")


def register_all() -> None:
    """Import every command module that exists (each adds its @app.command)."""
    for name in COMMAND_MODULES:
        try:
            importlib.import_module(f"recu_cli.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"recu_cli.commands.{name}":
                raise
