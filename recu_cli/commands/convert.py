"""`recu convert`: binarize a model without training; report what changed."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any

import typer

from recu_cli.app import app, console, print_json
from recu_cli.commands.options import Json, setting_parameters, with_settings
from recu_cli.convert_config import ConvertConfig
from recu_cli.errors import RecuError
from recu_cli.training.config import TrainConfig


@app.command()
@with_settings(
    setting_parameters(TrainConfig, only=("weights", "pretrained", "num_classes")),
    setting_parameters(
        ConvertConfig,
        defaults={"act_threshold": None},
        notes={"act_threshold": " (default: median with --data, else zero)"},
    ),
    setting_parameters(TrainConfig, only=("calib_images", "half", "keep_latent")),
    last=("data", "batch_size", "workers", "json_out"),
)
def convert(
    model: Annotated[
        str,
        typer.Argument(
            help="Model name: timm (resnet18), torchvision (tv:resnet18) or recu's (resnet20)."
        ),
    ],
    *,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write a packed .safetensors file.")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only print the conversion report.")
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
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1)] = 256,
    workers: Annotated[int, typer.Option("--workers", "-j", min=0)] = 2,
    json_out: Json = False,
    **conversion: Any,
) -> None:
    """Binarize MODEL's convolutions (no training) and print what became binary and why."""
    from recu_cli.bnn import check_keep, convert_model
    from recu_cli.models.create import create_model

    if not dry_run and output is None:
        raise RecuError(
            "nothing to do: pass --dry-run to see the report or -o FILE to write a packed file"
        )
    if output is not None:
        from recu_cli.atomic import check_target

        check_target(output)  # before the work: a FIFO or a device is never replaced
    calib_images, half, keep_latent = (
        conversion.pop(k) for k in ("calib_images", "half", "keep_latent")
    )
    weights, pretrained, num_classes = (
        conversion.pop(k) for k in ("weights", "pretrained", "num_classes")
    )
    if conversion["act_threshold"] is None:
        conversion["act_threshold"] = "median" if data is not None else "zero"
    config = ConvertConfig.from_flags(**conversion)
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
