"""Per-shape speed of the binary engines vs float32 F.conv2d on ResNet-18's 3x3 layers (224 px).

Not a test: a standalone benchmark. For every shape, thread count and batch size it times,
side by side in one process on the same inputs:
  float32  F.conv2d on a precomputed +-1 input (the float conv alone: no sign, no alpha, the
           most favourable baseline for float),
  xnor     the XNOR-popcount module (sign + bit-pack + conv + alpha epilogue),
  int8     the +-1 int8 module (same work through oneDNN's integer conv),
and prints median times with IQR and the ratio float32 / engine.

    python bench/runtime_layers.py                      # threads 1,2; batch 1,16; NCHW
    python bench/runtime_layers.py --layout nhwc --threads 1 --batch 1
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

from recu_cli.binarize.functions import sign_pos
from recu_cli.binarize.layers import BinaryConv2d
from recu_cli.runtime import available, fast_conv
from recu_cli.runtime.benchmark import measure
from recu_cli.runtime.cpuinfo import cpu_report

# (Cin, Cout, input H = W, stride): the distinct 3x3 convs of ResNet-18 at 224x224,
# the stride-2 ones being the first conv of layer2..layer4.
SHAPES = [
    (64, 64, 56, 1),
    (64, 128, 56, 2),
    (128, 128, 28, 1),
    (128, 256, 28, 2),
    (256, 256, 14, 1),
    (256, 512, 14, 2),
    (512, 512, 7, 1),
]


def layer(cin: int, cout: int, stride: int) -> BinaryConv2d:
    conv = BinaryConv2d(cin, cout, (3, 3), (stride, stride), (1, 1))
    with torch.no_grad():
        conv.weight_sign.copy_(sign_pos(torch.randn(conv.weight_sign.shape)))
        conv.alpha.uniform_(0.5, 1.5)
    return conv.eval()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    p.add_argument("--batch", default="1,16", help="comma-separated batch sizes")
    p.add_argument("--layout", choices=("nchw", "nhwc"), default="nchw")
    p.add_argument("--min-time", type=float, default=0.2, help="seconds per measurement")
    args = p.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    batches = [int(b) for b in args.batch.split(",")]
    engines = [e for e in ("xnor", "int8") if available(e)[0]]
    env = cpu_report()
    print(f"# {env['cpu_model']} | torch {env['torch']} ({env['cpu_capability']}) | "
          f"{env['flags']} | load {env['load_average']} | layout {args.layout}")  # fmt: skip
    fmt = torch.channels_last if args.layout == "nhwc" else torch.contiguous_format
    print("threads batch shape                      float32 ms     " + "".join(
        f"{e + ' ms':>16} {e + ' x':>7}" for e in engines))  # fmt: skip
    torch.manual_seed(0)
    with torch.no_grad():
        for th in threads:
            for b in batches:
                for cin, cout, hw, s in SHAPES:
                    conv = layer(cin, cout, s)
                    x = torch.randn(b, cin, hw, hw).contiguous(memory_format=fmt)
                    xs = sign_pos(x)
                    w = conv.weight_sign.contiguous(memory_format=fmt)
                    t_f = measure(lambda xs=xs, w=w, s=s: F.conv2d(xs, w, None, s, 1), th,
                                  args.min_time)  # fmt: skip
                    row = (f"{th:>7} {b:>5} {cin:>3}x{hw:>2}x{hw:<2}->{cout:<3} s{s}        "
                           f"{t_f.median_ms:8.3f}±{t_f.iqr_ms:<6.3f}")  # fmt: skip
                    for e in engines:
                        m = fast_conv(conv, e)
                        t_e = measure(lambda m=m, x=x: m(x), th, args.min_time)
                        ratio = t_f.median_ms / t_e.median_ms
                        row += f" {t_e.median_ms:8.3f}±{t_e.iqr_ms:<6.3f} {ratio:6.1f}x"
                    print(row, flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > 0.5:
        print(f"# note: load average {load:.2f} at the end: timings are noisy", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
