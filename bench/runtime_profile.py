"""Where the time of a runtime model goes (Amdahl): binary convs vs the float glue layers.

Not a test. Converts MODEL (random weights: timing does not depend on them), deploys it,
swaps in an engine and prints the time spent in each kind of layer per forward, measured
with forward hooks; what is left is the glue in the blocks' forward (shortcut adds).

    python bench/runtime_profile.py resnet18 --engine xnor --batch 1 --threads 1
    python bench/runtime_profile.py resnet18 --engine xnor --channels-last            # fast path
    python bench/runtime_profile.py resnet18 --engine xnor --channels-last --no-fuse  # per layer
    python bench/runtime_profile.py resnet18 --engine xnor --channels-last --fp-layers int8
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict

import torch
from torch import nn

from recu_cli.binarize.layers import BinaryConv2d
from recu_cli.bnn import convert_model, to_deploy
from recu_cli.models import create_model
from recu_cli.runtime import keep_freed_memory, to_runtime
from recu_cli.runtime.base import GroupedConv, RuntimeConv, WithBatchNorm
from recu_cli.runtime.fp_int8 import Int8Conv2d, Int8Linear
from recu_cli.runtime.fused import FusedBasicBlock, FusedStage, FusedStem


def group_of(m: nn.Module) -> str | None:
    """The Amdahl bucket of a leaf module (or of a fused one), None for containers."""
    if isinstance(m, (FusedBasicBlock, FusedStage)):
        return "fused blocks (binary convs + BN + shortcut + act + sign)"
    if isinstance(m, FusedStem):
        return "stem (conv + fused BN / act / max-pool)"
    if isinstance(m, (Int8Conv2d, Int8Linear)):
        return "int8 float layers (--fp-layers int8)"
    if isinstance(m, (BinaryConv2d, RuntimeConv, GroupedConv, WithBatchNorm)):
        return "binary convs (+ folded BN)"
    if list(m.children()):
        return None
    if isinstance(m, nn.Conv2d):
        return "float convs (stem, 1x1 shortcuts)"
    if (
        isinstance(m, (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d))
        or "Pool" in type(m).__name__
    ):
        return "pooling"
    if isinstance(m, nn.BatchNorm2d):
        return "batch norm (not folded)"
    if isinstance(m, nn.Linear):
        return "classifier"
    return "activations, other leaves"


def time_by_group(net: nn.Module, x: torch.Tensor, iters: int) -> dict[str, float]:
    """ms per forward spent inside each bucket's modules (perf_counter in forward hooks)."""
    totals: dict[str, float] = defaultdict(float)
    start: dict[int, float] = {}
    handles = []
    inside: set[int] = set()  # modules within a timed one (a fused block's shortcut conv)
    for m in net.modules():
        group = group_of(m)
        if group is None or id(m) in inside:
            continue
        inside.update(id(c) for c in m.modules() if c is not m)
        handles.append(
            m.register_forward_pre_hook(lambda m, _a: start.__setitem__(id(m), time.perf_counter()))
        )
        handles.append(
            m.register_forward_hook(
                lambda m, _a, _o, g=group: totals.__setitem__(
                    g, totals[g] + time.perf_counter() - start[id(m)]
                )
            )
        )
    t0 = time.perf_counter()
    for _ in range(iters):
        net(x)
    whole = time.perf_counter() - t0
    for h in handles:
        h.remove()
    out = {g: 1e3 * t / iters for g, t in totals.items()}
    out["shortcut adds, glue in forward()"] = 1e3 * whole / iters - sum(out.values())
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--engine", default="xnor", choices=("torch", "xnor", "int8"))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--no-fuse", action="store_true", help="per-layer engines (no fused blocks)")
    p.add_argument("--fp-layers", default="exact", choices=("exact", "int8"))
    args = p.parse_args(argv)
    keep_freed_memory()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model, spec = create_model(args.model)
    deploy = to_deploy(convert_model(model)[0])
    c, h, _ = spec.input_size
    size = args.img_size or h
    if args.engine == "torch":
        net = deploy.to(memory_format=torch.channels_last) if args.channels_last else deploy
    else:
        calib = [torch.randn(8, c, size, size)]  # timing does not depend on the calibration
        net = to_runtime(
            deploy, args.engine, channels_last=args.channels_last, fuse=not args.no_fuse,
            fp_layers=args.fp_layers, calibration=calib,
        )  # fmt: skip
    x = torch.randn(args.batch, c, size, size)
    with torch.no_grad():
        for _ in range(3):
            net(x)
        totals = time_by_group(net, x, args.iters)
    whole = sum(totals.values())
    layout = "NHWC" if args.channels_last else "NCHW"
    print(f"{args.model} {args.engine} batch={args.batch} threads={args.threads} {layout}: "
          f"{whole:.2f} ms per forward (forward hooks add a little)")  # fmt: skip
    for group, ms in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {group:56s} {ms:8.3f} ms  {100 * ms / whole:5.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
