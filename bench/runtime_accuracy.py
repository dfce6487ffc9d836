"""What the runtime's paths do to a trained BNN's predictions, on every validation image.

Not a test. For a packed checkpoint and an ImageFolder data set, prints the top-1 of the
float deploy form (NCHW and NHWC), of the xnor fast path with exact float layers, and with
--fp-layers int8 (calibrated on training images, as `recu eval` does), and how many images
each runtime path predicts differently from the float model in its layout.

    python bench/runtime_accuracy.py output/RUN/best.safetensors --data ../shared/data/cifar10
"""

from __future__ import annotations

import argparse
import copy
import json
import sys

import torch

from recu_cli.data import build_data, calibration_images, make_loader
from recu_cli.pack import load, read_spec
from recu_cli.runtime import keep_freed_memory, to_runtime


@torch.no_grad()
def predictions(net: torch.nn.Module, loader, nhwc: bool) -> tuple[torch.Tensor, torch.Tensor]:
    preds, labels = [], []
    for x, y in loader:
        x = x.contiguous(memory_format=torch.channels_last) if nhwc else x
        preds.append(net(x).argmax(1))
        labels.append(y)
    return torch.cat(preds), torch.cat(labels)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--data", required=True)
    p.add_argument("--calib-images", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    spec = read_spec(args.checkpoint)
    deploy = load(args.checkpoint).eval()
    bundle = build_data(args.data, spec, train=True)
    loader = make_loader(bundle.val, args.batch_size, 0)
    calib = list(calibration_images(bundle, args.calib_images, seed=0).split(64))
    nets = {
        "float NCHW": (deploy, False),
        "float NHWC": (copy.deepcopy(deploy).to(memory_format=torch.channels_last), True),
        "xnor NHWC exact": (to_runtime(deploy, "xnor", channels_last=True), True),
        "xnor NHWC fp-layers int8": (
            to_runtime(deploy, "xnor", channels_last=True, fp_layers="int8", calibration=calib),
            True,
        ),
    }
    out = {}
    preds = {}
    for name, (net, nhwc) in nets.items():
        preds[name], labels = predictions(net, loader, nhwc)
        out[name] = {"top1": round(100 * (preds[name] == labels).float().mean().item(), 2)}
    for name, ref in (
        ("xnor NHWC exact", "float NHWC"),
        ("xnor NHWC fp-layers int8", "float NHWC"),
    ):
        out[name]["differs_from_" + ref.replace(" ", "_")] = int((preds[name] != preds[ref]).sum())
    out["float NHWC"]["differs_from_float_NCHW"] = int(
        (preds["float NHWC"] != preds["float NCHW"]).sum()
    )
    out["images"] = int(len(labels))
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
