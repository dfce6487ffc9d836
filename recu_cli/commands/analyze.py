"""`recu analyze`: dead weights, entropy, quantization error and flips of a packed file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from recu_cli.app import app, console, print_json
from recu_cli.commands.options import Json

Compare = Annotated[
    Path | None,
    typer.Option(
        "--compare",
        help="An OLDER packed file of the same model: adds sign-flip rates (tail/core split "
        "when it holds latent weights).",
    ),
]
Plot = Annotated[
    Path | None,
    typer.Option(
        "--plot",
        help="Write a figure (.png/.pdf/.svg): per-layer W1 histograms with the dead tails, "
        "and dead share / entropy per layer. Needs matplotlib (pip install 'recu\\[plot]').",
    ),
]
Hist = Annotated[
    int,
    typer.Option("--hist", min=0, help="Show histograms of the N most and N least dead layers."),
]


@app.command()
def analyze(
    file: Annotated[Path, typer.Argument(help="A packed .safetensors checkpoint.")],
    compare: Compare = None,
    plot: Plot = None,
    hist: Hist = 1,
    json_out: Json = False,
) -> None:
    """Per-layer ReCU statistics stored in FILE: dead weights, entropy, QE (no latents needed)."""
    from recu_cli.report.analysis import analyze as run_analysis

    if plot is not None:
        from recu_cli.atomic import check_target
        from recu_cli.report.plots import require_matplotlib

        require_matplotlib()
        check_target(plot)
    result = run_analysis(file, compare)
    if plot is not None:
        from recu_cli.report.plots import plot_analysis

        plot_analysis(result, plot)
        result["plot"] = str(plot)
    if json_out:
        print_json(result)
        return
    from recu_cli.report.analysis import render_analysis

    render_analysis(console, result, hist_layers=hist)
    if plot is not None:
        console.print(f"wrote {plot}")
