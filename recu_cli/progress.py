"""Rich progress bars that stay quiet in logs (not a TTY) or with --quiet."""

from __future__ import annotations

import sys

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from recu_cli.console import err_console


def make_progress(quiet: bool = False) -> Progress:
    """A progress display on stderr; disabled when quiet or when stderr is not a terminal."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
        disable=quiet or not sys.stderr.isatty(),
    )
