"""The conversion report as a rich table."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from torch import nn

from recu_cli.bnn import ConversionReport


def render_conversion(
    console: Console, report: ConversionReport, model: nn.Module, title: str
) -> None:
    table = Table(title=title, header_style="bold")
    table.add_column("layer")
    table.add_column("shape")
    table.add_column("precision")
    table.add_column("why")
    table.add_column("params", justify="right")
    for e in report.layers:
        precision = "[green]1-bit[/]" if e.binary else "fp32"
        table.add_row(e.name, "x".join(map(str, e.shape)), precision, e.reason, f"{e.params:,}")
    console.print(table)
    t = report.totals(model)
    console.print(
        f"{t['binary_layers']} of {t['layers']} conv/linear layers binary; "
        f"{t['binary_params']:,} binary params, {t['full_precision_params']:,} full-precision "
        f"params ({100.0 * t['binary_params'] / max(t['total_params'], 1):.1f}% binary)"
    )
    if report.blocks_rewritten:
        console.print(
            f"Bi-Real shortcuts added in {len(report.blocks_rewritten)} residual blocks "
            f"({report.blocks_rewritten[0]} ... {report.blocks_rewritten[-1]})"
        )
    for a in report.activations_replaced:
        console.print(f"activation {a['name']}: {a['was']} -> {a['now']} (it feeds a binary conv)")
    if not t["binary_layers"]:
        console.print(
            "[yellow]warning:[/] no layer was binarized (no groups=1 conv larger than 1x1)"
        )
