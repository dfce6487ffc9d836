"""The Typer app and the small pieces every command shares (console, --json output)."""

from __future__ import annotations

import json
import math
import sys
from typing import Any

import typer

from recu_cli import __version__
from recu_cli.console import console, err_console

app = typer.Typer(
    name="recu",
    help="Turn a pretrained CNN into a bit-packed binary neural network with ReCU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

__all__ = ["DEBUG", "app", "console", "err_console", "print_json", "strict"]

DEBUG = {"enabled": False}


def print_json(obj: Any) -> None:
    """Machine-readable output: one strict JSON document on stdout, nothing else.

    NaN and infinities (a loss over no images, an accuracy that does not exist) become
    null: Python's json writes them as bare NaN/Infinity, which strict parsers reject."""
    text = json.dumps(strict(obj), indent=2, allow_nan=False, default=_json_default)
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def strict(obj: Any) -> Any:
    """`obj` with every non-finite float (tensor/numpy scalars included) as None."""
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [strict(v) for v in obj]
    return obj


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return strict(o.item())
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
