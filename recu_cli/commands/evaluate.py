"""`recu eval`: top-1/top-5 of a model by name (with weights) or of a packed checkpoint."""

from __future__ import annotations

from typing import Annotated

import typer

from recu_cli.app import app, console, print_json
from recu_cli.commands.options import FpLayers, Json, Quiet, setting_option
from recu_cli.errors import RecuError
from recu_cli.training.config import TrainConfig

# the model-loading flags of `recu binarize`, declared with its settings
Weights, Pretrained, NumClasses = (
    setting_option(TrainConfig, key) for key in ("weights", "pretrained", "num_classes")
)


@app.command("eval")
def eval_cmd(
    model: Annotated[
        str, typer.Argument(help="A packed .safetensors checkpoint, or a model name.")
    ],
    data: Annotated[
        str,
        typer.Option(
            "--data", "-d", help="Folder with val/ (ImageFolder), a dataset name, or 'demo'."
        ),
    ],
    weights: Weights = None,
    pretrained: Pretrained = False,
    num_classes: NumClasses = None,
    binarize: Annotated[
        bool, typer.Option("--binarize", help="Convert the named model to ReCU before evaluating.")
    ] = False,
    runtime: Annotated[
        str,
        typer.Option("--runtime", help="Inference engine for packed files: torch, xnor or int8."),
    ] = "torch",
    fp_layers: FpLayers = "exact",
    channels_last: Annotated[
        bool | None,
        typer.Option(
            "--channels-last/--channels-first",
            help="Memory format (default: NHWC, the fast path, with --runtime xnor/int8; NCHW "
            "with torch). The runtime's logits equal the torch model's in the same format.",
        ),
    ] = None,
    calib_images: Annotated[
        int,
        typer.Option(
            "--calib-images", min=1, help="Training images that calibrate --fp-layers int8."
        ),
    ] = 256,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1)] = 256,
    workers: Annotated[int, typer.Option("--workers", "-j", min=0)] = 2,
    device: Annotated[
        str | None,
        typer.Option("--device", help="cpu, cuda, cuda:N (default: cuda if present)."),
    ] = None,
    max_batches: Annotated[
        int | None, typer.Option("--max-batches", min=1, help="Stop after N batches.")
    ] = None,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Top-1 / top-5 accuracy (percent) on the validation split."""
    import torch

    from recu_cli.accuracy import evaluate
    from recu_cli.data import build_data, make_loader
    from recu_cli.devices import pick_device
    from recu_cli.targets import is_packed_file, load_target

    if runtime != "torch" and not is_packed_file(model):
        raise RecuError("--runtime applies to packed checkpoints; convert or train one first")
    dev = pick_device(device)
    target = load_target(
        model,
        "converted" if binarize else "float",
        num_classes=num_classes,
        pretrained=pretrained,
        weights=weights,
    )
    net, spec, name = target.model, target.spec, target.name
    if runtime != "torch" and dev.type != "cpu":
        if device:
            raise RecuError(f"--runtime {runtime} runs on the CPU; drop --device {device}")
        dev = torch.device("cpu")
    bundle = build_data(data, spec, train=False)
    from recu_cli.imagecheck import check_tree

    check_tree(bundle.val, "the validation images")
    if len(bundle.classes) != spec.num_classes:
        raise RecuError(
            f"{name} predicts {spec.num_classes} classes but {data} has {len(bundle.classes)}; "
            "evaluate on data with the same classes (or --num-classes for a new head)"
        )
    if fp_layers != "exact" and runtime == "torch":
        raise RecuError("--fp-layers applies to --runtime xnor or int8")
    nhwc = runtime != "torch" if channels_last is None else channels_last
    if runtime != "torch":
        net = _runtime_model(net, runtime, nhwc, fp_layers, data, spec, calib_images)
    elif nhwc:
        net = net.to(memory_format=torch.channels_last)
    loader = make_loader(bundle.val, batch_size, workers)
    net = net.to(dev)
    result = evaluate(
        net, loader, dev, quiet=quiet or json_out, description="eval", max_batches=max_batches
    )
    out = {"model": name, "data": bundle.source, **result.to_dict()}
    if json_out:
        print_json(out)
    else:
        console.print(
            f"{name} on {bundle.source}: top-1 {result.top1:.2f}%  top-5 {result.top5:.2f}%  "
            f"({result.images} images, loss {result.loss:.4f})"
        )


def _runtime_model(net, runtime: str, nhwc: bool, fp_layers: str, data: str, spec, n: int):
    """The packed model on recu's runtime; --fp-layers int8 calibrated on training images."""
    from recu_cli.data import build_data, calibration_images
    from recu_cli.runtime import keep_freed_memory, to_runtime
    from recu_cli.runtime.api import check_fp_layers

    check_fp_layers(fp_layers)
    calibration = None
    if fp_layers == "int8":
        try:
            bundle = build_data(data, spec, train=True)
        except RecuError:  # no train/ split: the validation images are all there is
            bundle = build_data(data, spec, train=False)
        calibration = list(calibration_images(bundle, n, seed=0).split(64))
    keep_freed_memory()
    return to_runtime(net, runtime, channels_last=nhwc, fp_layers=fp_layers,
                      calibration=calibration)  # fmt: skip
