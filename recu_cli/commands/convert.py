"""`recu convert`: binarize a model without training; report what changed."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated

import typer

from recu_cli.app import app, console, print_json
from recu_cli.commands.options import (
    Activation,
    AlphaInit,
    AlphaMode,
    BStar,
    Json,
    Keep,
    NoStandardize,
    NumClasses,
    PlainSign,
    Pretrained,
    Weights,
    convert_config,
)
from recu_cli.errors import RecuError


@app.command()
def convert(
    model: Annotated[
        str,
        typer.Argument(
            help="Model name: timm (resnet18), torchvision (tv:resnet18) or recu's (resnet20)."
        ),
    ],
    weights: Weights = None,
    pretrained: Pretrained = False,
    num_classes: NumClasses = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write a packed .safetensors file.")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only print the conversion report.")
    ] = False,
    keep: Keep = None,
    act: Activation = "hardtanh",
    b_star: BStar = 2.0,
    alpha_init: AlphaInit = "pretrained",
    alpha_mode: AlphaMode = "learned",
    no_standardize: NoStandardize = False,
    plain_sign: PlainSign = False,
    tau: Annotated[
        float, typer.Option("--tau", help="tau recorded in the layers (1 = no clamp).")
    ] = 1.0,
    half: Annotated[
        bool, typer.Option("--half", help="Store full-precision tensors as fp16.")
    ] = False,
    keep_latent: Annotated[
        bool, typer.Option("--keep-latent", help="Also store the latent weights.")
    ] = False,
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            "-d",
            help="Folder with train/ and val/: calibrate the thresholds on training images "
            "and report val top-1 of the original and the converted model (step 0).",
        ),
    ] = None,
    act_threshold: Annotated[
        str | None,
        typer.Option(
            "--act-threshold",
            help="zero (paper), learned or median (default: median with --data, else zero).",
        ),
    ] = None,
    calib_images: Annotated[
        int, typer.Option("--calib-images", min=1, help="Training images for calibration.")
    ] = 256,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1)] = 256,
    workers: Annotated[int, typer.Option("--workers", "-j", min=0)] = 2,
    json_out: Json = False,
) -> None:
    """Binarize MODEL's convolutions (no training) and print what became binary and why."""
    from recu_cli.bnn import check_keep, convert_model
    from recu_cli.models.create import create_model

    if not dry_run and output is None:
        raise RecuError(
            "nothing to do: pass --dry-run to see the report or -o FILE to write a packed file"
        )
    threshold = act_threshold or ("median" if data is not None else "zero")
    config = convert_config(
        keep, act, b_star, alpha_init, alpha_mode, no_standardize, plain_sign, tau, threshold
    )
    net, spec = create_model(model, num_classes=num_classes, pretrained=pretrained, weights=weights)
    original = copy.deepcopy(net) if data is not None else None
    check_keep(net, config.keep)
    net, report = convert_model(net, config)
    result = {"model": spec.full_name, **report.to_dict(net)}
    if original is not None:
        from recu_cli.step0 import measure_step0

        result["step0"] = measure_step0(
            original, net, config, spec, data, calib_images, batch_size, workers
        )
    if output is not None:
        from recu_cli.pack import save
        from recu_cli.stats import model_stats

        summary = save(
            output, net, spec, config, stats=model_stats(net), half=half, keep_latent=keep_latent
        )
        result["output"] = str(output)
        result["file"] = summary
    if json_out:
        print_json(result)
        return
    from recu_cli.report.conversion import render_conversion

    render_conversion(console, report, net, title=f"{spec.full_name}: ReCU conversion")
    if "step0" in result:
        from recu_cli.step0 import describe_step0

        console.print(f"step 0 on {data}: {describe_step0(result['step0'])}")
    if output is not None:
        console.print(f"wrote {output} ({output.stat().st_size:,} bytes)")
