"""The two consoles every part of recu prints to: below the CLI, so core modules that
print (training logs, progress bars) do not import the command-line app."""

from __future__ import annotations

import sys

from rich.console import Console

console = Console(stderr=False, highlight=False, width=None if sys.stdout.isatty() else 140)
err_console = Console(stderr=True, highlight=False)


def echo_err(msg: str) -> None:
    """One plain line on stderr: no markup, no highlighting, no wrapping."""
    err_console.print(msg, highlight=False, markup=False, soft_wrap=True)
