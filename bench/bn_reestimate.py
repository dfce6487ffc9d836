"""Does BatchNorm re-estimation help a finished BNN? Val top-1 of a packed checkpoint
before and after its BatchNorm statistics are recomputed on training images.

The same computation as `recu binarize --bn-recalib N` after the last step (training
transforms, the first N batches of a seeded shuffle, cumulative averages), applied to a
checkpoint that already exists, so one finished run answers the question without a
second training run.

    python bench/bn_reestimate.py output/RUN/last.safetensors --data ../shared/data/cifar10
"""

from __future__ import annotations

import argparse
import json

import torch

from recu_cli import pack
from recu_cli.accuracy import evaluate
from recu_cli.calibrate import image_batches, reestimate_batchnorm
from recu_cli.data import build_data, make_loader


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--data", required=True)
    ap.add_argument("--batches", type=int, nargs="*", default=[50], help="N training batches")
    ap.add_argument("-b", "--batch-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args()

    model = pack.load(args.checkpoint)
    spec = pack.read_spec(args.checkpoint)
    data = build_data(args.data, spec, train=True)
    val = make_loader(data.val, 256, 1)
    gen = torch.Generator().manual_seed(args.seed)
    train = make_loader(data.train, args.batch_size, 1, shuffle=True, generator=gen)
    rows = {"before": evaluate(model, val).top1}
    for n in args.batches:
        model = pack.load(args.checkpoint)
        used = reestimate_batchnorm(model, image_batches(train, n))
        rows[f"after_{used}_batches"] = evaluate(model, val).top1
    print(json.dumps({"checkpoint": args.checkpoint, "val_top1": rows}, indent=2))


if __name__ == "__main__":
    main()
