"""`recu export`: a packed checkpoint as ONNX, QONNX or a torch.export program (docs/deploy.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from recu_cli.app import app, console, print_json
from recu_cli.commands.options import Json, Quiet


@app.command("export")
def export_cmd(
    file: Annotated[Path, typer.Argument(help="A packed .safetensors checkpoint.")],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="The file to write (.onnx or .pt2).")
    ],
    fmt: Annotated[
        str | None,
        typer.Option(
            "--format",
            "-f",
            help="onnx (standard operators), qonnx (BipolarQuant) or pt2 (torch.export); "
            "default: from the output's suffix.",
        ),
    ] = None,  # fmt: skip
    packed: Annotated[
        bool,
        typer.Option(
            "--packed", help="ONNX: store binary weights as 1-bit uint8 rows unpacked in the graph."
        ),
    ] = False,
    alpha_in_quant: Annotated[
        bool,
        typer.Option(
            "--alpha-in-quant",
            help="QONNX: alpha as the weights' BipolarQuant scale (Brevitas layout; not exact).",
        ),
    ] = False,
    exact_rounding: Annotated[
        bool,
        typer.Option(
            "--exact-rounding",
            help="ONNX/QONNX: BatchNorm, alpha and a small stem conv as float64 fma emulation, so "
            "every sign matches recu bit for bit (slower; not for TensorRT/FINN).",
        ),
    ] = False,
    data: Annotated[
        str | None,
        typer.Option(
            "--data", "-d", help="Verify on real val images (folder with val/, or 'demo')."
        ),
    ] = None,
    verify_batch: Annotated[
        int, typer.Option("--verify-batch", min=1, help="Images (or random inputs) to verify on.")
    ] = 32,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random verification batch.")] = 0,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Export for onnxruntime / OpenVINO / FINN / libtorch; verified before it is written."""
    from recu_cli.export import export_file

    result = export_file(
        file, output, fmt, packed=packed, alpha_in_quant=alpha_in_quant, data=data,
        batch=verify_batch, seed=seed, exact_rounding=exact_rounding,
    )  # fmt: skip
    if json_out:
        print_json(result.to_dict())
        return
    opset = f", ONNX opset {result.opset}" if result.opset else ""
    console.print(
        f"wrote {result.path} ({result.format}{', packed' if result.packed else ''}{opset}): "
        f"{result.bytes:,} bytes ({result.bytes / result.source_bytes:.2f}x the checkpoint)"
    )
    for check in result.checks:
        mark = "checked" if check.required != "none" else "measured"
        console.print(f"  {mark}: {escape(check.line())}")
    for note in result.notes:
        console.print(f"[dim]note: {escape(note)}[/]")
