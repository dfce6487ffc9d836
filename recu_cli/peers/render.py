"""The rich table of `recu bench --peers`: one row per entry, one column pair per setting."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

NOISY_LOAD = 0.5


def _speedup(ms: float | None, base: float | None) -> str:
    return "-" if not ms or not base else f"{base / ms:.2f}x"


def render(report: dict, console: Console) -> None:
    env, peers = report["env"], report["peers"]
    console.print(
        f"[bold]{escape(report['model'])}[/] input {tuple(report['input_size'])} | "
        f"{env['cpu_model']} ({env['cpu_count']} CPUs) | torch {env['torch']} | "
        f"load average {env['load_average']}"
    )
    table = Table(
        title="recu's BNN engines vs what a user would deploy instead (ms, median; speed-up = "
        "OpenVINO int8 ms / entry ms)"
    )
    table.add_column("entry")
    table.add_column("key", style="dim")
    for s in peers["settings"]:
        table.add_column(f"thr {s['threads']} b {s['batch']}", justify="right")
        table.add_column("vs OV int8", justify="right")
    for key in peers["keys"]:
        info = peers["entries"][key]
        if not info["available"]:
            continue
        cells = []
        for s in peers["settings"]:
            ms = s["ms"][key]
            cells += ["-" if ms is None else f"{ms:.3f}", _speedup(ms, s["ms"]["openvino_int8"])]
        table.add_row(escape(info["detail"]), key, *cells)
    console.print(table)
    for key, why in peers["skipped"].items():
        console.print(f"[yellow]{key} skipped:[/] {escape(why)}")
    console.print(
        "[dim]peers (torch, ort, openvino) run the float original: "
        f"{escape(peers['float_weights'])}. recu_* run the BNN in {peers['recu_layout']}. "
        "int8 peers calibrated on "
        f"{escape(peers['calibration'])}.[/]"
    )
    load = env["load_average"]
    if load and load[0] > NOISY_LOAD:
        console.print(
            f"[yellow]note:[/] load average {load[0]:.2f}: other processes share the CPU, so "
            "these timings are noisy; rerun on a quiet machine"
        )
