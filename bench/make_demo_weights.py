"""Train the full-precision ResNet-20 that `recu binarize resnet20 --data demo` starts from.

recu is for binarizing *pretrained* networks, so its offline demo ships one: ResNet-20
trained here on the built-in demo data (a Fashion-MNIST subset), stored as fp16 safetensors
in recu_cli/demo/. Remake it with:

    OMP_NUM_THREADS=1 python bench/make_demo_weights.py --epochs 15
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from recu_cli.accuracy import evaluate
from recu_cli.data import build_data
from recu_cli.demo import DEMO_WEIGHTS
from recu_cli.models import create_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--out", type=Path, default=DEMO_WEIGHTS)
    args = ap.parse_args()
    torch.manual_seed(0)
    model, spec = create_model("resnet20", num_classes=10)
    data = build_data("demo", spec, train=True)
    train = torch.utils.data.DataLoader(data.train, batch_size=128, shuffle=True, num_workers=0)
    val = torch.utils.data.DataLoader(data.val, batch_size=256, num_workers=0)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    steps = args.epochs * len(train)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    for epoch in range(args.epochs):
        model.train()
        for images, targets in train:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(images), targets).backward()
            opt.step()
            sched.step()
        print(f"epoch {epoch + 1}: val top-1 {evaluate(model, val).top1:.2f}%", flush=True)
    state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()
             if v.is_floating_point()}  # fmt: skip
    state |= {k: v for k, v in model.state_dict().items() if not v.is_floating_point()}
    save_file(state, str(args.out), metadata={"made_by": "bench/make_demo_weights.py"})
    print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
