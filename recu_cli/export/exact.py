"""Rewrite an exported graph so its float layers round exactly like recu's PyTorch reference.

In a Bi-Real network every binary activation is the sign of a real-valued residual stream
(stem conv -> BatchNorm -> PReLU, then BatchNorm(alpha * count) + shortcut per block), so a
last-bit difference anywhere upstream can flip a sign at a threshold (docs/deploy.md). What
PyTorch's CPU kernels compute, measured bit for bit (bench/export_rounding.py):

- BatchNorm2d (eval): fma(x, a, s) per element, a = f32(1 / sqrt(var + eps)) * weight,
  s = fma(-mean, a, bias): one rounding. onnxruntime's BatchNormalization rounds twice.
- the binary conv's `* alpha`: one float32 product of an exact integer count; exact in any
  runtime, unless a runtime folds alpha into the conv weights (ConvMulFusion).
- the stem conv (oneDNN, small fp convs): a chain of fma over the taps in (kh, kw, c) order.

ONNX has no fma, but float64 has room for it: the product of two float32 values is exact in
float64, so Cast(x, double) * a + s, Cast back to float32 is the fma up to double rounding
of the sum (an error needs the float64 sum to be inexact and to land exactly on a float32
midpoint; the export check compares every logit anyway). This module, run on the ModelProto
that onnx_graph / qonnx built:

- BatchNormalization -> Cast(double) -> Mul(a) -> Add(s) -> Cast(float)
- Mul(alpha) after a binary Conv -> Cast(double) -> Mul(alpha) -> Cast(float) (exact: the
  float64 product is exact, its one rounding is float32's); no runtime can fold it into the
  conv, so onnxruntime's default optimizations keep it exact too
- a small full-precision Conv (at most MAX_TAPS taps per output, groups 1) whose PyTorch
  result is bit-identical with the float64 fma chain on a random probe -> that chain
  (Pad, Slice per tap, Mul, Add, Cast). Otherwise the Conv stays as it is.

All standard ONNX operators (Cast, Mul, Add, Pad, Slice).
"""

from __future__ import annotations

import itertools
from fractions import Fraction
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

MAX_TAPS = 64  # c * kh * kw of an fp conv written as an fma chain (the CIFAR stem has 27)
PROBE_SEED = 0


def round_f32(q: Fraction) -> np.float32:
    """The float32 nearest to the rational q (ties to even): one correct rounding."""
    f = np.float32(float(q))
    cands = [np.nextafter(f, np.float32(-np.inf)), f, np.nextafter(f, np.float32(np.inf))]

    def key(c: np.float32) -> tuple[Fraction, int]:
        return abs(Fraction(float(c)) - q), int(np.array(c, np.float32).view(np.int32)) & 1

    return min(cands, key=key)


def bn_terms(
    weight: np.ndarray, bias: np.ndarray, mean: np.ndarray, var: np.ndarray, eps: float
) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch's eval BatchNorm constants: a = (1 / sqrt(var + eps)) * w, s = fma(-mean, a, b)."""
    # scalar IEEE float32, as ATen's `1 / std::sqrt(var + eps)` (torch's vectorised 1 / t is
    # not correctly rounded, so this stays in numpy)
    var32, w32 = np.asarray(var, np.float32), np.asarray(weight, np.float32)
    invstd = np.float32(1) / np.sqrt(var32 + np.float32(eps))
    a = (invstd * w32).astype(np.float32)
    s = np.array(
        [round_f32(Fraction(float(b)) - Fraction(float(m)) * Fraction(float(ai)))
         for b, m, ai in zip(bias.astype(np.float32), mean.astype(np.float32), a, strict=True)],
        np.float32,
    )  # fmt: skip
    return a.astype(np.float32), s


def fma_chain_reference(
    x: np.ndarray, w: np.ndarray, stride: list[int], pads: list[int], dil: list[int]
) -> np.ndarray:
    """What the rewritten graph computes for a conv: float64 fma emulation, taps (kh, kw, c)."""
    o, c, kh, kw = w.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    ho = (xp.shape[2] - dil[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (xp.shape[3] - dil[1] * (kw - 1) - 1) // stride[1] + 1
    acc = None
    for i, j, ci in itertools.product(range(kh), range(kw), range(c)):
        t = xp[:, ci:ci + 1, i * dil[0]:i * dil[0] + (ho - 1) * stride[0] + 1:stride[0],
               j * dil[1]:j * dil[1] + (wo - 1) * stride[1] + 1:stride[1]]  # fmt: skip
        p = t * w[:, ci, i, j].astype(np.float64).reshape(1, -1, 1, 1)
        acc = (
            p.astype(np.float32) if acc is None else (acc.astype(np.float64) + p).astype(np.float32)
        )
    assert acc is not None
    return acc


def conv_matches_chain(
    w: np.ndarray, in_shape: list[int], stride: list[int], pads: list[int], dil: list[int]
) -> bool:
    """Is PyTorch's float32 conv bit-identical with the fma chain on a random probe?"""
    gen = torch.Generator().manual_seed(PROBE_SEED)
    x = torch.randn(4, *in_shape, generator=gen)
    wt = torch.as_tensor(w, dtype=torch.float32)
    with torch.no_grad():
        ref = F.conv2d(x, wt, None, stride, (pads[0], pads[1]), dil).numpy()
    got = fma_chain_reference(x.numpy(), w, stride, pads, dil)
    return ref.shape == got.shape and bool(np.array_equal(ref, got))


class _Rewriter:
    def __init__(self, proto: Any) -> None:
        import onnx

        self.onnx = onnx
        self.proto = proto
        g = proto.graph
        self.inits = {t.name: t for t in g.initializer}
        self.producer = {o: n for n in g.node for o in n.output}
        self.names = set(self.inits) | {o for n in g.node for o in n.output}
        self.names |= {n.name for n in g.node} | {i.name for i in g.input}
        self.new_inits: list = []
        self.shapes: dict[str, list[int]] = {}
        try:
            inferred = onnx.shape_inference.infer_shapes(proto)
            for vi in list(inferred.graph.value_info) + list(inferred.graph.input):
                dims = vi.type.tensor_type.shape.dim
                self.shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else -1
                                        for d in dims]  # fmt: skip
        except Exception:  # noqa: BLE001 - without shapes no conv is rewritten
            pass
        self.counts = {"BatchNormalization": 0, "alpha Mul": 0, "fp Conv": 0, "fp Conv kept": 0}

    def fresh(self, base: str) -> str:
        from recu_cli.export.onnx_nodes import unique_name

        return unique_name(base, self.names)

    def const(self, base: str, arr: np.ndarray) -> str:
        name = self.fresh(base)
        self.new_inits.append(self.onnx.numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def as_f64(self, out: list, base: str, arr: np.ndarray | None, name: str | None = None) -> str:
        """A float32 constant (new, or the initializer `name`) cast to float64 in the graph
        (exact; runtimes fold it at load): half the bytes of a float64 initializer."""
        src = name if name is not None else self.const(base, np.asarray(arr, np.float32))
        return self.node(out, "Cast", [src], base, to=self.onnx.TensorProto.DOUBLE)

    def node(self, out: list, op: str, inputs: list[str], base: str, output: str | None = None,
             **attrs: Any) -> str:  # fmt: skip
        """One node, unnamed, its output `_e<n>` (node names are optional and ~350 nodes with
        long names would add ~7 KB to a 90 KB ResNet-20 file)."""
        y = output or self.fresh(f"_e{len(self.names)}")
        out.append(self.onnx.helper.make_node(op, inputs, [y], **attrs))
        return y

    def array(self, name: str) -> np.ndarray | None:
        t = self.inits.get(name)
        return None if t is None else self.onnx.numpy_helper.to_array(t)

    def is_binary_conv(self, n: Any) -> bool:
        if n is None or n.op_type != "Conv":
            return False
        w = self.array(n.input[1])
        return w is None or bool(np.isin(w, (-1.0, 1.0)).all())  # computed (unpacked / quant)

    def run(self) -> dict[str, int]:
        g = self.proto.graph
        out: list = []
        D, FL = self.onnx.TensorProto.DOUBLE, self.onnx.TensorProto.FLOAT
        for n in g.node:
            base = n.output[0]
            if n.op_type == "BatchNormalization" and all(i in self.inits for i in n.input[1:5]):
                eps = next((a.f for a in n.attribute if a.name == "epsilon"), 1e-5)
                a, s = bn_terms(*(self.array(i) for i in n.input[1:5]), eps)  # type: ignore[misc]
                shape = [1, -1] + [1] * max(0, len(self.shapes.get(n.input[0], [0, 0, 0, 0])) - 2)
                xd = self.node(out, "Cast", [n.input[0]], base, to=D)
                y = self.node(out, "Mul", [xd, self.as_f64(out, f"{base}.a", a.reshape(shape))],
                              base)  # fmt: skip
                y = self.node(out, "Add", [y, self.as_f64(out, f"{base}.s", s.reshape(shape))],
                              base)  # fmt: skip
                self.node(out, "Cast", [y], base, output=n.output[0], to=FL)
                self.counts["BatchNormalization"] += 1
                continue
            if (n.op_type == "Mul" and n.input[1] in self.inits
                    and self.is_binary_conv(self.producer.get(n.input[0]))):  # fmt: skip
                xd = self.node(out, "Cast", [n.input[0]], base, to=D)
                y = self.node(out, "Mul", [xd, self.as_f64(out, base, None, n.input[1])], base)
                self.node(out, "Cast", [y], base, output=n.output[0], to=FL)
                self.counts["alpha Mul"] += 1
                continue
            if n.op_type == "Conv" and not self.is_binary_conv(n):
                if self.fp_conv_chain(n, out):
                    self.counts["fp Conv"] += 1
                    continue
                self.counts["fp Conv kept"] += 1
            out.append(n)
        del g.node[:]
        g.node.extend(out)
        used = {i for n in out for i in n.input}
        kept = [t for t in g.initializer if t.name in used]
        del g.initializer[:]
        g.initializer.extend(kept + self.new_inits)
        return self.counts

    def fp_conv_chain(self, n: Any, out: list) -> bool:
        w = self.array(n.input[1])
        if w is None or self.is_binary_conv(n) or w.ndim != 4 or len(n.input) > 2 and n.input[2]:
            return False
        attrs = {a.name: self.onnx.helper.get_attribute_value(a) for a in n.attribute}
        auto_pad = attrs.get("auto_pad", b"NOTSET")
        if int(attrs.get("group", 1)) != 1 or auto_pad not in (b"NOTSET", "NOTSET"):
            return False
        o, c, kh, kw = w.shape
        shape = self.shapes.get(n.input[0])
        if c * kh * kw > MAX_TAPS or not shape or len(shape) != 4 or min(shape[1:]) <= 0:
            return False
        stride = [int(v) for v in attrs.get("strides", [1, 1])]
        dil = [int(v) for v in attrs.get("dilations", [1, 1])]
        pads = [int(v) for v in attrs.get("pads", [0, 0, 0, 0])]
        if not conv_matches_chain(w.astype(np.float32), shape[1:], stride, pads, dil):
            return False
        base = n.output[0]
        D, FL = self.onnx.TensorProto.DOUBLE, self.onnx.TensorProto.FLOAT
        _, _, h, wd = shape
        hp, wp = h + pads[0] + pads[2], wd + pads[1] + pads[3]
        ho = (hp - dil[0] * (kh - 1) - 1) // stride[0] + 1
        wo = (wp - dil[1] * (kw - 1) - 1) // stride[1] + 1
        x = self.node(out, "Cast", [n.input[0]], base, to=D)
        if any(pads):
            pad_arr = np.array([0, 0, pads[0], pads[1], 0, 0, pads[2], pads[3]], np.int64)
            x = self.node(out, "Pad", [x, self.const(f"{base}.pads", pad_arr)], base,
                          mode="constant")  # fmt: skip
        axes = self.const(f"{base}.axes", np.array([1, 2, 3], np.int64))
        steps = self.const(f"{base}.steps", np.array([1, stride[0], stride[1]], np.int64))
        acc = None
        taps = list(itertools.product(range(kh), range(kw), range(c)))
        for k, (i, j, ci) in enumerate(taps):
            t0 = [ci, i * dil[0], j * dil[1]]
            t1 = [ci + 1, t0[1] + (ho - 1) * stride[0] + 1, t0[2] + (wo - 1) * stride[1] + 1]
            tb = f"{base}.{k}"
            b, e = (
                self.const(f"{tb}.{s}", np.array(v, np.int64)) for s, v in (("b", t0), ("e", t1))
            )
            t = self.node(out, "Slice", [x, b, e, axes, steps], tb)
            wcol = self.as_f64(out, f"{tb}.w", w[:, ci, i, j].reshape(1, o, 1, 1))
            p = self.node(out, "Mul", [t, wcol], tb)
            last = n.output[0] if k == len(taps) - 1 else None
            if acc is not None:
                p = self.node(out, "Add", [self.node(out, "Cast", [acc], tb, to=D), p], tb)
            acc = self.node(out, "Cast", [p], tb, output=last, to=FL)
        return True


def exact_float_layers(proto: Any) -> dict[str, int]:
    """Rewrite `proto` in place (see the module docstring); how many nodes of each kind."""
    return _Rewriter(proto).run()


def sign_inputs(
    model: torch.nn.Module, x: torch.Tensor
) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
    """recu's logits, and what each binary conv's activation compares with its threshold:
    the values an exported graph must reproduce bit for bit for no sign to flip."""
    from recu_cli.binarize.layers import BinaryConv2d

    seen: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0].clone()))
             for n, m in model.named_modules() if isinstance(m, BinaryConv2d)]  # fmt: skip
    try:
        with torch.no_grad():
            ref = model(x).numpy()
    finally:
        for h in hooks:
            h.remove()
    return ref, seen
