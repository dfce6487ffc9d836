"""The walk over a traced model: torch.fx stops at the layers recu can write, and each
traced node (layer, function, tensor method) becomes its ONNX nodes.

Layers are written by onnx_layers.py, binary convs by a BinaryConvWriter (onnx_nodes.py);
this module owns the tracing and the functions and methods a forward may call.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from recu_cli.binarize.layers import BinaryConv2d
from recu_cli.errors import RecuError
from recu_cli.export.onnx_layers import flatten, global_pool, write_layer
from recu_cli.export.onnx_nodes import (
    INPUT_NAME,
    INT64_MAX,
    OUTPUT_NAME,
    BinaryConvWriter,
    GraphBuilder,
)

_LEAVES = (
    BinaryConv2d, nn.Conv2d, nn.BatchNorm2d, nn.Linear, nn.ReLU, nn.ReLU6, nn.Hardtanh,
    nn.PReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Identity,
    nn.Dropout,
)  # fmt: skip


class _Tracer(fx.Tracer):
    """torch.fx tracer that stops at the layers this module knows how to write."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:  # noqa: D102
        return isinstance(m, _LEAVES) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    """fx graph of the model with shapes recorded on every node (meta['tensor_meta'])."""
    from torch.fx.passes.shape_prop import ShapeProp

    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # noqa: BLE001 - fx raises many types for untraceable code
        raise RecuError(
            f"cannot trace {type(model).__name__} for export ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:160] if str(e) else ''}); only fx-traceable CNNs export"
        ) from e
    gm = fx.GraphModule(model, graph)
    with torch.no_grad():
        ShapeProp(gm).propagate(example)
    return gm


def write_graph(gm: fx.GraphModule, conv_writer: BinaryConvWriter) -> tuple[list, list]:
    """The ONNX nodes and initializers of a traced model."""
    return _Writer(gm, conv_writer).run()


def rank(n: fx.Node) -> int:
    """Rank of a traced node's output; a node that is not one tensor cannot export."""
    meta = n.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        raise RecuError(f"cannot export {n.format_node()}: its output is not one tensor")
    return len(meta.shape)


class _Writer:
    """Walks the fx graph and emits the ONNX nodes of each traced node."""

    def __init__(self, gm: fx.GraphModule, conv_writer: BinaryConvWriter) -> None:
        self.gm = gm
        self.g = GraphBuilder()
        self.bw = conv_writer
        self.env: dict[str, Any] = {}
        self.modules = dict(gm.named_modules())

    def value(self, a: Any) -> Any:
        if isinstance(a, fx.Node):
            return self.env[a.name]
        if isinstance(a, (list, tuple)):
            return type(a)(self.value(v) for v in a)
        return a

    def run(self) -> tuple[list, list]:
        for n in self.gm.graph.nodes:
            if n.op == "placeholder":
                self.env[n.name] = INPUT_NAME
            elif n.op == "output":
                res = n.args[0]
                if not isinstance(res, fx.Node):
                    raise RecuError("export needs a model with one output tensor (the logits)")
                self.g.nodes.append(
                    self.g.onnx.helper.make_node("Identity", [self.env[res.name]], [OUTPUT_NAME])
                )
            elif n.op == "call_module":
                self.env[n.name] = self.module(n)
            elif n.op == "call_function":
                self.env[n.name] = self.function(n)
            elif n.op == "call_method":
                self.env[n.name] = self.method(n)
            elif n.op == "get_attr":
                self.env[n.name] = self.g.const(n.target, getattr_path(self.gm, n.target))
            else:
                raise RecuError(f"cannot export graph node {n.format_node()}")
        return self.g.nodes, self.g.inits

    def module(self, n: fx.Node) -> str:
        m, name, x = self.modules[n.target], str(n.target), self.value(n.args[0])
        if isinstance(m, BinaryConv2d):
            return self.bw.write(self.g, x, m, name)
        return write_layer(self.g, m, x, name, lambda: rank(n.args[0]))

    def function(self, n: fx.Node) -> str:
        f, args, kw = n.target, n.args, n.kwargs
        name = n.name
        handlers: dict[Callable, Callable[[], str]] = {
            operator.add: lambda: self._add(n),
            operator.iadd: lambda: self._add(n),
            torch.add: lambda: self._add(n),
            operator.getitem: lambda: self._getitem(n),
            F.pad: lambda: self._pad(n),
            torch.flatten: lambda: self._flatten(args[0], _flatten_dims(args[1:], kw), name),
            F.adaptive_avg_pool2d: lambda: global_pool(
                self.g,
                self.value(args[0]),
                args[1] if len(args) > 1 else kw["output_size"],
                name,
            ),  # fmt: skip
            F.relu: lambda: self.g.node("Relu", [self.value(args[0])], name),
            torch.relu: lambda: self.g.node("Relu", [self.value(args[0])], name),
            torch.cat: lambda: self._cat(n),
        }
        if f in handlers:
            return handlers[f]()
        raise RecuError(f"cannot export function {getattr(f, '__name__', f)} ({n.format_node()})")

    def method(self, n: fx.Node) -> str:
        args, kw, name = n.args, n.kwargs, n.name
        if n.target == "flatten":
            return self._flatten(args[0], _flatten_dims(args[1:], kw), name)
        if n.target in ("add", "add_", "__add__"):
            return self._add(n)
        if n.target in ("relu", "relu_"):
            return self.g.node("Relu", [self.value(args[0])], name)
        if n.target == "mean":
            dims = args[1] if len(args) > 1 else kw.get("dim")
            keep = bool(args[2] if len(args) > 2 else kw.get("keepdim", False))
            r = rank(args[0])
            axes = [int(d) % r for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
            return self.g.node(
                "ReduceMean", [self.value(args[0]), self.g.const(f"{name}.axes", np.array(axes))],
                name, keepdims=int(keep),
            )  # fmt: skip
        raise RecuError(f"cannot export tensor method .{n.target}() ({n.format_node()})")

    def _flatten(self, src: Any, dims: tuple[int, int], name: str) -> str:
        return flatten(self.g, self.value(src), rank(src), *dims, name)

    def _add(self, n: fx.Node) -> str:
        if n.kwargs.get("alpha", 1) != 1 or len(n.args) != 2:
            raise RecuError(f"cannot export {n.format_node()}: only plain a + b exports")
        a, b = (self._operand(v, n.name) for v in n.args)
        return self.g.node("Add", [a, b], n.name)

    def _operand(self, v: Any, name: str) -> str:
        if isinstance(v, fx.Node):
            return self.env[v.name]
        if isinstance(v, (int, float)):
            return self.g.const(f"{name}.const", np.array(float(v), np.float32))
        raise RecuError(f"cannot export operand {v!r} of {name}")

    def _cat(self, n: fx.Node) -> str:
        tensors = n.args[0]
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
        r = rank(tensors[0])
        return self.g.node("Concat", [self.value(t) for t in tensors], n.name, axis=int(dim) % r)

    def _getitem(self, n: fx.Node) -> str:
        src, idx = n.args
        if not isinstance(src, fx.Node) or "tensor_meta" not in src.meta:
            raise RecuError(f"cannot export indexing {n.format_node()}")
        idx = idx if isinstance(idx, tuple) else (idx,)
        if not all(isinstance(s, slice) for s in idx):
            raise RecuError(f"cannot export {n.format_node()}: only slicing (a:b:c) exports")
        starts, ends, axes, steps = [], [], [], []
        for axis, s in enumerate(idx):
            if s == slice(None):
                continue
            step = 1 if s.step is None else int(s.step)
            if step <= 0:
                raise RecuError(f"cannot export {n.format_node()}: negative slice steps")
            starts.append(0 if s.start is None else int(s.start))
            ends.append(INT64_MAX if s.stop is None else int(s.stop))
            axes.append(axis)
            steps.append(step)
        x = self.value(src)
        if not axes:
            return x
        g, name = self.g, n.name
        ins = [x] + [g.const(f"{name}.{k}", np.array(v, np.int64))
                     for k, v in (("starts", starts), ("ends", ends), ("axes", axes),
                                  ("steps", steps))]  # fmt: skip
        return g.node("Slice", ins, name)

    def _pad(self, n: fx.Node) -> str:
        args, kw = n.args, n.kwargs
        pad = list(args[1] if len(args) > 1 else kw["pad"])
        mode = args[2] if len(args) > 2 else kw.get("mode", "constant")
        value = args[3] if len(args) > 3 else kw.get("value", None)
        if mode != "constant":
            raise RecuError(f"cannot export {n.format_node()}: only constant padding exports")
        r = rank(args[0])
        begin, end = [0] * r, [0] * r
        for i in range(len(pad) // 2):  # torch lists (left, right) from the last dim backwards
            begin[r - 1 - i], end[r - 1 - i] = int(pad[2 * i]), int(pad[2 * i + 1])
        g, name = self.g, n.name
        ins = [self.value(args[0]), g.const(f"{name}.pads", np.array(begin + end, np.int64)),
               g.const(f"{name}.value", np.array(float(value or 0.0), np.float32))]  # fmt: skip
        return g.node("Pad", ins, name, mode="constant")


def _flatten_dims(args: tuple, kw: dict) -> tuple[int, int]:
    start = args[0] if args else kw.get("start_dim", 0)
    end = args[1] if len(args) > 1 else kw.get("end_dim", -1)
    return int(start), int(end)


def getattr_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj
