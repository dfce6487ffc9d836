"""`recu eval`: top-1/top-5 of a model by name (with weights) or of a packed checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
import typer

from recu_cli.app import app, console, print_json
from recu_cli.commands.options import Json, NumClasses, Pretrained, Quiet, Weights
from recu_cli.devices import pick_device
from recu_cli.errors import RecuError


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
    from recu_cli.data import build_data, make_loader
    from recu_cli.evaluate import evaluate

    dev = pick_device(device)
    path = Path(model)
    if path.is_file() or model.endswith(".safetensors"):
        if weights or pretrained or binarize:
            raise RecuError(
                "--weights/--pretrained/--binarize apply to model names, not packed files"
            )
        from recu_cli.pack import load, read_spec

        spec = read_spec(path)
        net = load(path)
        if runtime != "torch":
            from recu_cli.runtime import to_runtime

            if dev.type != "cpu":
                if device:
                    raise RecuError(f"--runtime {runtime} runs on the CPU; drop --device {device}")
                dev = torch.device("cpu")
            net = to_runtime(net, runtime)
        name = str(path)
    else:
        if runtime != "torch":
            raise RecuError("--runtime applies to packed checkpoints; convert or train one first")
        from recu_cli.models import create_model

        net, spec = create_model(
            model, num_classes=num_classes, pretrained=pretrained, weights=weights
        )
        if binarize:
            from recu_cli.convert import convert_model

            net, _ = convert_model(net)
        name = spec.full_name
    bundle = build_data(data, spec, train=False)
    from recu_cli.imagecheck import check_tree

    check_tree(bundle.val, "the validation images")
    if len(bundle.classes) != spec.num_classes:
        raise RecuError(
            f"{name} predicts {spec.num_classes} classes but {data} has {len(bundle.classes)}; "
            "evaluate on data with the same classes (or --num-classes for a new head)"
        )
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
