"""`recu info`: sizes and compute of a packed file, computed from the file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from recu_cli.app import app, console, print_json
from recu_cli.commands.options import Json


@app.command()
def info(
    file: Annotated[Path, typer.Argument(help="A packed .safetensors checkpoint.")],
    json_out: Json = False,
) -> None:
    """Larq-style summary: 1-bit vs fp params, bytes on disk, compression, BOPs/FLOPs."""
    from recu_cli.report.info import render_info, summarize

    summary = summarize(file)
    if json_out:
        print_json(summary)
        return
    render_info(console, summary)
