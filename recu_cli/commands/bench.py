"""`recu bench`: the binary runtime engines vs float32 PyTorch, per layer and end to end."""

from __future__ import annotations

import dataclasses
from typing import Annotated

import typer
from rich.table import Table

from recu_cli.app import app, console, err_console, print_json
from recu_cli.commands.options import FpLayers, Json, Quiet
from recu_cli.errors import RecuError
from recu_cli.spec import MAX_SIDE, MIN_SIDE, check_batch

FAST_ENGINES = ("xnor", "int8")
NOISY_LOAD = 0.5


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise RecuError(f"{option} expects comma-separated positive integers, got {text!r}")
    return list(dict.fromkeys(values))


def _engines(text: str) -> tuple[list[str], dict[str, tuple[bool, str]]]:
    """Engines to time, and (available, detail) for each fast engine."""
    from recu_cli.runtime import ENGINES, available

    status = {e: available(e) for e in FAST_ENGINES}
    if text == "auto":
        chosen = [e for e in FAST_ENGINES if status[e][0]]
        if not chosen:
            raise RecuError(
                "no runtime engine can run here (" + "; ".join(s[1] for s in status.values()) + ")",
                exit_code=1,
            )
        return chosen, status
    chosen = list(dict.fromkeys(e.strip() for e in text.split(",") if e.strip()))
    for e in chosen:
        if e not in ENGINES:
            raise RecuError(f"unknown engine {e!r}; choose among {', '.join(FAST_ENGINES)}")
        if e == "torch":
            raise RecuError("torch is the float32 baseline, timed anyway; choose xnor and/or int8")
        if not status[e][0]:
            raise RecuError(f"engine {e} cannot run here: {status[e][1]}", exit_code=1)
    return chosen, status


def _ms(t: dict | None) -> str:
    return "-" if t is None else f"{t['median_ms']:.3f} ± {t['iqr_ms']:.3f}"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _render(report: dict) -> None:
    env = report["env"]
    flags = ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in env["flags"].items())
    console.print(
        f"[bold]{report['model']}[/] input {tuple(report['input_size'])} | {env['cpu_model']} "
        f"({env['cpu_count']} CPUs) | {flags}\n"
        f"torch {env['torch']} ({env['cpu_capability']}) | xnor kernels: {env['xnor_isa']} | "
        f"load average {env['load_average']}"
    )
    for e, info in report["engines"].items():
        if not info["available"]:
            console.print(f"[yellow]{e} skipped:[/] {info['detail']}")
    layout = "NHWC" if report["channels_last"] else "NCHW"
    summary = Table(
        title=f"engines vs the float32 deploy form, {layout} (ms, end to end: median ± IQR)"
    )
    for col in ("engine", "thr", "batch", "bin fp32", "bin eng", "bin x", "e2e fp32",
                "e2e eng", "e2e x", "exact", "same out", "top-1"):  # fmt: skip
        summary.add_column(col, justify="left" if col == "engine" else "right")
    for s in report["settings"]:
        for r in s["engines"]:
            fl = s["float32_binary_layers_ms"]
            summary.add_row(
                r["engine"], str(r["threads"]), str(r["batch"]),
                "-" if fl is None else f"{fl:.3f}",
                "-" if r["binary_layers_ms"] is None else f"{r['binary_layers_ms']:.3f}",
                _x(r["binary_layers_speedup"]), _ms(s["float32_end_to_end"]),
                _ms(r["end_to_end"]), _x(r["end_to_end_speedup"]),
                "yes" if r["bit_exact"] else "[red]NO[/]",
                "yes" if r["identical_outputs"] else f"{r['max_rel_diff']:.0e}",
                f"{100 * r['argmax_agree']:.0f}%",
            )  # fmt: skip
    console.print(summary)
    for s in report["settings"]:
        if not s["layers"] or s["layers"][0]["float32"] is None:
            continue
        engines = [r["engine"] for r in s["engines"]]
        t = Table(title=f"binary layers, threads={s['threads']} batch={s['batch']} (ms)")
        for col in ("layer", "shape", "float32", *engines):
            t.add_column(col, justify="left" if col in ("layer", "shape") else "right")
        for row in s["layers"]:
            f = row["float32"]["median_ms"]
            cells = [
                f"{row['engines'][e]['median_ms']:.3f} ({f / row['engines'][e]['median_ms']:.1f}x)"
                for e in engines
            ]
            t.add_row(row["name"], row["shape"], f"{f:.3f}", *cells)
        console.print(t)
    console.print(
        "[dim]bin: the binary convs (+ the BN each engine fuses), timed alone; e2e: the whole "
        "model; exact: integer dot products equal F.conv2d's; same out: logits bit-identical "
        "(else the max relative difference); top-1: same predictions.[/]"
    )
    if env["load_average"] and env["load_average"][0] > NOISY_LOAD:
        console.print(
            f"[yellow]note:[/] load average {env['load_average'][0]:.2f}: other processes share "
            "the CPU, so these timings are noisy; rerun on a quiet machine"
        )


def _bench_peers(
    target: str, engine: str, threads: list[int], batches: list[int], img_size: int | None,
    min_time: float, min_runs: int, seed: int, channels_last: bool, data: str | None,
    json_out: bool, quiet: bool, fp_layers: str, rounds: int,
) -> None:  # fmt: skip
    """`--peers`: recu's engines next to PyTorch, ONNX Runtime and OpenVINO (recu_cli.peers)."""
    from recu_cli.peers import run_peers
    from recu_cli.peers.render import render
    from recu_cli.peers.source import load_models
    from recu_cli.runtime.cpuinfo import cpu_report

    if engine == "auto":
        from recu_cli.runtime import available

        status = {e: available(e) for e in FAST_ENGINES}
        chosen = [e for e in FAST_ENGINES if status[e][0]]
    else:
        chosen, status = _engines(engine)
    models = load_models(target, img_size)
    check_batch(max(batches), models.spec.input_size, "--batch")
    show = not (quiet or json_out)

    def step(msg: str) -> None:
        if show:
            err_console.print(f"[dim]timed {msg}[/]")

    result = run_peers(
        models, chosen, status, threads, batches, data=data, min_time=min_time,
        min_runs=min_runs, seed=seed, channels_last=channels_last, on_step=step,
        runtime_options={"fp_layers": fp_layers}, rounds=rounds,
    )  # fmt: skip
    report = {
        "model": models.name,
        "fp_layers": fp_layers,
        "input_size": list(models.spec.input_size),
        "env": cpu_report(),
        "min_time_s": min_time,
        "min_runs": min_runs,
        "peers": result,
    }
    if json_out:
        print_json(report)
    else:
        render(report, console)


@app.command()
def bench(
    target: Annotated[
        str,
        typer.Argument(
            metavar="FILE_OR_MODEL",
            help="A packed .safetensors checkpoint, or a model name (converted on the fly).",
        ),
    ],
    engine: Annotated[
        str,
        typer.Option("--engine", "-e", help="Comma-separated: xnor, int8 (default: all that run)."),
    ] = "auto",
    threads: Annotated[
        str, typer.Option("--threads", "-t", help="Comma-separated thread counts.")
    ] = "1,2",
    batch: Annotated[
        str, typer.Option("--batch", "-b", help="Comma-separated batch sizes.")
    ] = "1,16",
    img_size: Annotated[
        int | None,
        typer.Option(
            "--img-size",
            min=MIN_SIDE,
            max=MAX_SIDE,
            help="Input height and width (default: the model's).",
        ),
    ] = None,
    min_time: Annotated[
        float,
        typer.Option("--min-time", min=0.01, help="Seconds of timing per measurement."),
    ] = 0.2,
    min_runs: Annotated[
        int,
        typer.Option("--min-runs", min=1, help="At least this many timed replicates (slow calls)."),
    ] = 10,
    layers: Annotated[
        bool,
        typer.Option(
            "--layers/--no-layers",
            help="Also time each binary layer alone (several times longer; off by default).",
        ),
    ] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random input.")] = 0,
    channels_last: Annotated[
        bool,
        typer.Option(
            "--channels-last/--channels-first",
            help="Memory format of the float baseline and the engines: NHWC (the runtime's fast "
            "path, fused blocks) or NCHW (per-layer engines).",
        ),
    ] = True,
    fp_layers: FpLayers = "exact",
    peers: Annotated[
        bool,
        typer.Option(
            "--peers",
            help="Instead: time the float original in PyTorch, ONNX Runtime and OpenVINO (fp32 "
            'and int8) against recu\'s engines (pip install -e ".[peers]").',
        ),
    ] = False,
    rounds: Annotated[
        int,
        typer.Option(
            "--rounds",
            min=1,
            help="With --peers: time every entry this many times, round after round, and keep "
            "each entry's best median (a shared machine's slow spells then cost one round).",
        ),
    ] = 3,
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            "-d",
            help="Real images (its train/, else val/) that calibrate the int8 peers and "
            "--fp-layers int8.",
        ),
    ] = None,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Time the XNOR and int8 engines against the float32 deploy form, side by side."""
    from recu_cli.runtime import ext, keep_freed_memory
    from recu_cli.runtime.api import check_fp_layers
    from recu_cli.runtime.benchmark import run_benchmark
    from recu_cli.runtime.cpuinfo import cpu_report

    check_fp_layers(fp_layers)
    env = cpu_report()  # before any work: the load of the others, not of this bench
    thread_list = _int_list(threads, "--threads")
    batch_list = _int_list(batch, "--batch")
    if data is not None and not peers and fp_layers != "int8":
        raise RecuError("--data calibrates int8 models; use it with --peers or --fp-layers int8")
    keep_freed_memory()  # every engine and peer in this process gets the same allocator
    if peers:
        _bench_peers(target, engine, thread_list, batch_list, img_size, min_time, min_runs,
                     seed, channels_last, data, json_out, quiet, fp_layers, rounds)  # fmt: skip
        return
    chosen, status = _engines(engine)
    from recu_cli.targets import load_target

    loaded = load_target(target)
    model, spec, name = loaded.model, loaded.spec, loaded.name
    input_size = tuple(spec.input_size)
    if img_size is not None:
        input_size = (input_size[0], img_size, img_size)
    check_batch(max(batch_list), input_size, "--batch")
    show = not (quiet or json_out)

    def step(msg: str) -> None:
        if show:
            err_console.print(f"[dim]timed {msg}[/]")

    calibration = None
    if fp_layers == "int8" and data is not None:
        import torch

        from recu_cli.data import spread_inputs

        spec = dataclasses.replace(spec, input_size=tuple(input_size))
        calibration = [torch.cat(spread_inputs(data, spec, 16)[0])]
    results = run_benchmark(
        model, input_size, chosen, thread_list, batch_list, min_time=min_time,
        min_runs=min_runs, layers=layers, seed=seed, channels_last=channels_last, on_step=step,
        fp_layers=fp_layers, calibration=calibration,
    )  # fmt: skip
    env["xnor_isa"] = ext.detected_isa() if status["xnor"][0] else None
    settings = [r.to_dict() for r in results]
    flat = []
    for s in settings:
        for r in s["engines"]:
            flat.append({**r, "float32_end_to_end": s["float32_end_to_end"],
                         "float32_binary_layers_ms": s["float32_binary_layers_ms"]})  # fmt: skip
    report = {
        "model": name,
        "input_size": list(input_size),
        "env": env,
        "engines": {e: {"available": ok, "detail": why} for e, (ok, why) in status.items()},
        "min_time_s": min_time,
        "min_runs": min_runs,
        "channels_last": channels_last,
        "fp_layers": fp_layers,
        "results": flat,
        "settings": settings,
    }
    if json_out:
        print_json(report)
    else:
        _render(report)
