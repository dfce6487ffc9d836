"""Where an ONNX export of a recu BNN diverges from recu's PyTorch reference, and why (issue 13).

    PYTHONPATH=$PWD python bench/export_rounding.py CKPT [--data DIR] [--images 500]

For a packed ResNet-20 checkpoint and N balanced CIFAR-10 val images:

1. the reference itself: batch size and thread count do not change recu's logits;
2. what PyTorch's CPU kernels compute, found bit for bit: eval BatchNorm2d against candidate
   formulas, the stem conv against fma / mul+add chains in every tap order;
3. per binary activation point (the input of each GreaterOrEqual), in onnxruntime: the share
   of pre-activations whose float32 bits differ from PyTorch's, the max difference, the sign
   flips and the images they are in: for the plain graph (`onnx_graph.build_model`) under
   three session settings, and for the graph after `export.exact.exact_float_layers`;
4. how close the pre-activations sit to their thresholds (density within 1 and 8 ulps).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from recu_cli.export import exact, onnx_graph
from recu_cli.pack import load, read_spec

F32, F64 = np.float32, np.float64


def cifar_val(root: Path, n: int) -> torch.Tensor:
    from torchvision import datasets, transforms

    from recu_cli.spec import IMAGENET_MEAN, IMAGENET_STD  # what the CIFAR zoo normalises by

    tf = transforms.Compose([transforms.Resize(32), transforms.ToTensor(),
                             transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])  # fmt: skip
    ds = datasets.ImageFolder(str(root / "val"), transform=tf)
    per = max(1, n // len(ds.classes))
    idx = [c * 500 + i for c in range(len(ds.classes)) for i in range(per)][:n]
    return torch.stack([ds[i][0] for i in idx])


def fma64(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    return (a.astype(F64) * b.astype(F64) + c.astype(F64)).astype(F32)


def torch_kernels(model: torch.nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        y = model.conv1(x)
        z = model.bn1(y).numpy()
    bn = model.bn1
    w, b, mu, var = (t.detach().numpy() for t in (bn.weight, bn.bias, bn.running_mean,
                                                  bn.running_var))  # fmt: skip
    inv = F32(1) / np.sqrt(var + F32(bn.eps))
    a = inv * w
    r = lambda v: v.reshape(1, -1, 1, 1)  # noqa: E731
    yn = y.numpy()
    cands = {
        "x*a + (b - mean*a), two roundings (onnxruntime-like)": yn * r(a) + r(b - mu * a),
        "fma(x, a, b - mean*a)": fma64(yn, r(a), r(b - mu * a)),
        "fma(x, a, fma(-mean, a, b))": fma64(yn, r(a), r(fma64(-mu, a, b))),
        "(x - mean) * invstd * w + b": (yn - r(mu)) * r(inv) * r(w) + r(b),
    }
    print("\n[2] eval BatchNorm2d (bn1 on the stem's output): elements differing from PyTorch")
    for k, v in cands.items():
        print(f"    {k:55s} {np.mean(v != z) * 100:7.3f} %")
    print("    stem conv (oneDNN) vs chains over the 27 taps, acc from 0:")
    xp = np.pad(x.numpy(), ((0, 0), (0, 0), (1, 1), (1, 1)))
    W = model.conv1.weight.detach().numpy()
    axes = ("kh", "kw", "c")
    for perm in itertools.permutations(range(3)):
        for use_fma in (True, False):
            acc = np.zeros(yn.shape, F32)
            for t in itertools.product(range(3), repeat=3):
                idx = [0, 0, 0]
                for pos, ax in enumerate(perm):
                    idx[ax] = t[pos]
                i, j, c = idx
                tap = xp[:, c : c + 1, i : i + 32, j : j + 32]
                wv = W[:, c, i, j].reshape(1, -1, 1, 1)
                acc = fma64(tap, wv, acc) if use_fma else acc + tap * wv
            order = ", ".join(axes[p] for p in perm)
            kind = "fma" if use_fma else "mul+add"
            print(f"      loops ({order}) {kind:8s} {np.mean(acc != yn) * 100:7.3f} %")


def probe_graph(proto, path: Path) -> dict[str, str]:
    names = {n.name.split("/")[0]: n.input[0] for n in proto.graph.node
             if n.op_type == "GreaterOrEqual"}  # fmt: skip
    for v in names.values():
        proto.graph.output.append(onnx.helper.make_tensor_value_info(v, onnx.TensorProto.FLOAT,
                                                                     None))  # fmt: skip
    onnx.save(proto, str(path))
    return names


def run(path: Path, x: np.ndarray, setting: str) -> dict[str, np.ndarray]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    kw = {}
    if setting == "disable_all":
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    elif setting == "fusions off":
        kw = {"disabled_optimizers": ["ConvMulFusion", "ConvBNFusion", "ConvAddFusion"]}
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"], **kw)
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input": x}),
                    strict=True))  # fmt: skip


def compare(model, names, outs, ref, seen, label: str) -> None:
    lg = outs[onnx_graph.OUTPUT_NAME]
    print(f"\n  {label}: argmax {(lg.argmax(1) == ref.argmax(1)).sum()}/{len(ref)}, "
          f"max |logit diff| {np.abs(lg - ref).max():.3g}")  # fmt: skip
    first = None
    for layer, name in names.items():
        m = model.get_submodule(layer)
        thr = (m.act_threshold.view(1, -1, 1, 1) if m.act_threshold is not None
               else torch.zeros(1)).numpy()  # fmt: skip
        a, b = seen[layer].numpy(), outs[name]
        flips = (a >= thr) != (b >= thr)
        n_img = int(flips.reshape(len(a), -1).any(1).sum())
        if flips.any() and first is None:
            first = layer
        print(
            f"    {layer:16s} bits differ {np.mean(a != b) * 100:5.1f} %  "
            f"max|d| {np.abs(a - b).max():8.3g}  flips {int(flips.sum()):5d} in {n_img} images"
        )
    print(f"    first flip: {first}")


def density(model, seen) -> None:
    print("\n[4] pre-activations near their threshold (counts, PyTorch)")
    for layer, a in seen.items():
        m = model.get_submodule(layer)
        thr = (m.act_threshold.view(1, -1, 1, 1) if m.act_threshold is not None
               else torch.zeros(1)).numpy()  # fmt: skip
        a = a.numpy()
        d = np.abs(a - thr)
        ulp = np.spacing(np.maximum(np.abs(a), np.abs(thr)).astype(F32))
        print(
            f"    {layer:16s} of {d.size:8d}: within 1 ulp {int((d <= ulp).sum()):3d}, "
            f"within 8 ulps {int((d <= 8 * ulp).sum()):4d}, exactly equal {int((d == 0).sum())}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--data", default="/work/shared/data/cifar10")
    p.add_argument("--images", type=int, default=500)
    args = p.parse_args()
    t0 = time.time()
    model, spec = load(args.checkpoint).eval(), read_spec(args.checkpoint)
    x = cifar_val(Path(args.data), args.images)
    with torch.no_grad():
        ref = model(x)
        ref16 = torch.cat([model(x[i : i + 16]) for i in range(0, len(x), 16)])
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        ref1 = model(x)
        torch.set_num_threads(threads)
    print(
        f"[1] reference: batch {len(x)} vs 16 max diff {float((ref - ref16).abs().max())}, "
        f"{threads} vs 1 thread max diff {float((ref - ref1).abs().max())}"
    )
    torch_kernels(model, x[:50])
    ref, seen = exact.sign_inputs(model, x)
    xs = x.numpy()
    print(f"\n[3] sign inputs in onnxruntime {ort.__version__} vs PyTorch {torch.__version__}")
    with tempfile.TemporaryDirectory() as d:
        plain = onnx_graph.build_model(model, spec, onnx_graph.BinaryConvWriter(), fmt="onnx")
        names = probe_graph(plain, Path(d) / "plain.onnx")
        for setting in ("disable_all", "fusions off", "default"):
            outs = run(Path(d) / "plain.onnx", xs, setting)
            compare(model, names, outs, ref, seen, f"plain graph, {setting}")
        ex = onnx_graph.build_model(model, spec, onnx_graph.BinaryConvWriter(), fmt="onnx")
        print("\n  exact_float_layers:", exact.exact_float_layers(ex))
        names = probe_graph(ex, Path(d) / "exact.onnx")
        for setting in ("fusions off", "default"):
            outs = run(Path(d) / "exact.onnx", xs, setting)
            compare(model, names, outs, ref, seen, f"exact graph, {setting}")
    density(model, seen)
    print(f"\n({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
