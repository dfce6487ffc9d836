"""The Typer app and the small pieces every command shares (console, --json output)."""

from __future__ import annotations

import json
import sys
from typing import Any

import typer
from rich.console import Console

from recu_cli import __version__

app = typer.Typer(
    name="recu",
    help="Turn a pretrained CNN into a bit-packed binary neural network with ReCU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

console = Console(stderr=False, highlight=False, width=None if sys.stdout.isatty() else 140)
err_console = Console(stderr=True, highlight=False)

DEBUG = {"enabled": False}


def print_json(obj: Any) -> None:
    """Machine-readable output: one JSON document on stdout, nothing else."""
    sys.stdout.write(json.dumps(obj, indent=2, default=_json_default) + "\n")
    sys.stdout.flush()


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"recu {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version."
    ),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
) -> None:
    """recu: ReCU binary neural networks (Xu et al., ICCV 2021) from timm/torchvision models."""
    DEBUG["enabled"] = debug
