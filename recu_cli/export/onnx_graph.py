"""Standard-ONNX graph of a deploy model, written node by node with the `onnx` helper API.

Why not `torch.onnx.export`: its optimizers fold and fuse (Conv + BatchNorm, constant
unpacking of packed weights, Sign for the activation), and recu needs a graph whose nodes
say exactly what a binary conv is. So the model is traced with torch.fx (binary convs and
the usual layers as leaves), and every traced node is written as the ONNX operators below:

    binary conv   Where(GreaterOrEqual(x, thr), 1, -1) -> Conv(+-1 weights) -> Mul(alpha)
                  (-> Add(bias)); sign(0) = +1, thr = the layer's act_threshold or 0
    --packed      the +-1 weights as uint8 bits [O, ceil(K/8)] (MSB first, bit 1 = +1, as in
                  docs/format.md), unpacked in the graph: Reshape -> BitShift -> BitwiseAnd
                  -> Cast(bool) -> Where(1, -1) (-> Reshape -> Slice) -> Reshape
    BatchNorm2d   BatchNormalization (its own node; never folded into a conv)
    shortcuts     Add; the CIFAR option-A shortcut is Slice (stride 2) + Pad (zero channels)
    fp layers     Conv, Gemm, Relu, Clip (Hardtanh), PRelu, MaxPool, AveragePool,
                  GlobalAveragePool, Flatten, Concat, as they are

A layer or function outside this list is one RecuError line naming it.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from recu_cli import __version__
from recu_cli.binarize.layers import BinaryConv2d
from recu_cli.errors import RecuError
from recu_cli.models import ModelSpec

OPSET = 18  # BitwiseAnd (packed weights) needs 18; onnxruntime, OpenVINO and qonnx run it
IR_VERSION = 9  # the IR of opset 18; newer IRs are refused by older runtimes
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
QONNX_DOMAIN = "qonnx.custom_op.general"
INT64_MAX = np.iinfo(np.int64).max

_LEAVES = (
    BinaryConv2d, nn.Conv2d, nn.BatchNorm2d, nn.Linear, nn.ReLU, nn.ReLU6, nn.Hardtanh,
    nn.PReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Identity,
    nn.Dropout,
)  # fmt: skip


def _onnx() -> Any:
    try:
        import onnx
    except ImportError as e:  # the command checks extras first; this guards library use
        raise RecuError(
            'exporting needs the onnx package; pip install "recu[export]"', exit_code=1
        ) from e
    return onnx


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


class GraphBuilder:
    """Accumulates ONNX nodes and initializers with unique names."""

    def __init__(self) -> None:
        self.onnx = _onnx()
        self.nodes: list = []
        self.inits: list = []
        self._names: set[str] = set()
        self._shared: dict[str, str] = {}

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self._names:
            name, i = f"{base}_{i}", i + 1
        self._names.add(name)
        return name

    def const(self, base: str, value: np.ndarray | torch.Tensor) -> str:
        """A named initializer (float tensors are stored as float32)."""
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        arr = np.asarray(value)
        if arr.dtype == np.float64:
            arr = arr.astype(np.float32)
        name = self.fresh(base)
        self.inits.append(self.onnx.numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def shared(self, key: str, value: np.ndarray) -> str:
        """One initializer per distinct small constant (1, -1, shift tables...)."""
        if key not in self._shared:
            self._shared[key] = self.const(key, value)
        return self._shared[key]

    def node(self, op: str, inputs: list[str], base: str, *, domain: str = "", **attrs: Any) -> str:
        """Append one node with one output; returns the output's name."""
        out = self.fresh(base)
        self.nodes.append(
            self.onnx.helper.make_node(
                op, inputs, [out], name=self.fresh(f"{base}/{op}"), domain=domain, **attrs
            )
        )
        return out


def pack_bits(weight_sign: torch.Tensor) -> tuple[np.ndarray, int]:
    """[O, ceil(K/8)] uint8 rows, MSB first, bit 1 = +1 (docs/format.md section 3); and K."""
    w = weight_sign.detach().cpu().reshape(weight_sign.shape[0], -1).numpy()
    return np.packbits(w >= 0, axis=1, bitorder="big"), w.shape[1]


def _shape(g: GraphBuilder, dims: list[int]) -> str:
    """One int64 shape initializer per distinct shape."""
    return g.shared("shape_" + "x".join(str(int(d)) for d in dims), np.array(dims, np.int64))


def _pads(padding: tuple[int, int]) -> list[int]:
    return [int(padding[0]), int(padding[1]), int(padding[0]), int(padding[1])]


def _pair(v: int | tuple[int, ...]) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(t) for t in v]


class BinaryConvWriter:
    """Writes one BinaryConv2d in standard ONNX (activation, weights, conv, alpha, bias)."""

    def __init__(self, packed: bool = False) -> None:
        self.packed = packed

    def activation(self, g: GraphBuilder, x: str, name: str, thr: torch.Tensor | None) -> str:
        """+1 where x >= thr, else -1 (Sign would map 0 to 0)."""
        t = (
            g.shared("zero_f32", np.array(0.0, np.float32))
            if thr is None
            else g.const(f"{name}.act_threshold", thr.detach().float().reshape(1, -1, 1, 1))
        )
        ge = g.node("GreaterOrEqual", [x, t], f"{name}/ge")
        one = g.shared("one_f32", np.array(1.0, np.float32))
        minus = g.shared("minus_one_f32", np.array(-1.0, np.float32))
        return g.node("Where", [ge, one, minus], f"{name}/sign")

    def weight(self, g: GraphBuilder, m: BinaryConv2d, name: str) -> str:
        """+-1 float32 initializer, or the in-graph unpacking of 1-bit rows."""
        if not self.packed:
            return g.const(f"{name}.weight_sign", m.weight_sign.detach().float())
        bits, k = pack_bits(m.weight_sign)
        o, nbytes = bits.shape
        src = g.const(f"{name}.weight_bits", bits)
        col = g.node("Reshape", [src, _shape(g, [o, nbytes, 1])], f"{name}/bits_col")
        shifts = g.shared("bit_shifts_u8", np.arange(7, -1, -1, dtype=np.uint8))
        shifted = g.node("BitShift", [col, shifts], f"{name}/bits_shift", direction="RIGHT")
        one_u8 = g.shared("one_u8", np.array(1, np.uint8))
        bit = g.node("BitwiseAnd", [shifted, one_u8], f"{name}/bits_and")
        on = g.node("Cast", [bit], f"{name}/bits_bool", to=int(g.onnx.TensorProto.BOOL))
        one = g.shared("one_f32", np.array(1.0, np.float32))
        minus = g.shared("minus_one_f32", np.array(-1.0, np.float32))
        pm = g.node("Where", [on, one, minus], f"{name}/bits_pm1")  # [O, bytes, 8]
        if k != nbytes * 8:  # drop each row's spare low bits of the last byte
            rows = g.node("Reshape", [pm, _shape(g, [o, nbytes * 8])], f"{name}/bits_rows")
            pm = g.node(
                "Slice",
                [rows, g.shared("zero_i64_1", np.array([0], np.int64)),
                 g.shared(f"i64_{k}", np.array([k], np.int64)),
                 g.shared("one_i64_1", np.array([1], np.int64))],
                f"{name}/bits_trim",
            )  # fmt: skip
        return g.node("Reshape", [pm, _shape(g, list(m.weight_sign.shape))], f"{name}/weight_pm1")

    def conv_attrs(self, m: BinaryConv2d) -> dict[str, Any]:
        kh, kw = m.kernel_size
        return {
            "kernel_shape": [kh, kw],
            "strides": _pair(m.stride),
            "pads": _pads(m.padding),
            "dilations": _pair(m.dilation),
            "group": int(m.groups),
        }

    def write(self, g: GraphBuilder, x: str, m: BinaryConv2d, name: str) -> str:
        """The whole binary conv: returns the output tensor's name."""
        xb = self.activation(g, x, name, getattr(m, "act_threshold", None))
        w = self.weight(g, m, name)
        y = g.node("Conv", [xb, w], f"{name}/conv", **self.conv_attrs(m))
        alpha = m.alpha.detach().float().reshape(1, -1, 1, 1)
        y = g.node("Mul", [y, g.const(f"{name}.alpha", alpha)], f"{name}/alpha")
        if m.bias is not None:
            b = m.bias.detach().float().reshape(1, -1, 1, 1)
            y = g.node("Add", [y, g.const(f"{name}.bias", b)], f"{name}/bias")
        return y


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

    @staticmethod
    def rank(n: fx.Node) -> int:
        meta = n.meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape"):
            raise RecuError(f"cannot export {n.format_node()}: its output is not one tensor")
        return len(meta.shape)

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

    # -- layers ----------------------------------------------------------------------------

    def module(self, n: fx.Node) -> str:
        m = self.modules[n.target]
        name = str(n.target)
        x = self.value(n.args[0])
        g = self.g
        if isinstance(m, BinaryConv2d):
            return self.bw.write(g, x, m, name)
        if isinstance(m, (nn.Identity, nn.Dropout)):
            return x
        if isinstance(m, nn.Conv2d):
            if m.padding_mode != "zeros" or isinstance(m.padding, str):
                raise RecuError(f"{name}: only numeric zero padding exports (got {m.padding!r})")
            ins = [x, g.const(f"{name}.weight", m.weight.detach().float())]
            if m.bias is not None:
                ins.append(g.const(f"{name}.bias", m.bias.detach().float()))
            return g.node(
                "Conv", ins, name, kernel_shape=list(m.kernel_size), strides=_pair(m.stride),
                pads=_pads(m.padding), dilations=_pair(m.dilation), group=int(m.groups),
            )  # fmt: skip
        if isinstance(m, nn.BatchNorm2d):
            if m.running_mean is None or m.running_var is None:
                raise RecuError(f"{name}: a BatchNorm without running statistics cannot export")
            c = m.num_features
            gamma = m.weight.detach() if m.weight is not None else torch.ones(c)
            beta = m.bias.detach() if m.bias is not None else torch.zeros(c)
            ins = [
                x,
                g.const(f"{name}.weight", gamma.float()),
                g.const(f"{name}.bias", beta.float()),
                g.const(f"{name}.running_mean", m.running_mean.float()),
                g.const(f"{name}.running_var", m.running_var.float()),
            ]
            return g.node("BatchNormalization", ins, name, epsilon=float(m.eps))
        if isinstance(m, nn.ReLU):
            return g.node("Relu", [x], name)
        if isinstance(m, (nn.Hardtanh, nn.ReLU6)):
            lo, hi = (0.0, 6.0) if isinstance(m, nn.ReLU6) else (m.min_val, m.max_val)
            return self._clip(x, name, lo, hi)
        if isinstance(m, nn.PReLU):
            slope = m.weight.detach().float()
            slope = slope.reshape(-1, 1, 1) if slope.numel() > 1 else slope.reshape(1)
            return g.node("PRelu", [x, g.const(f"{name}.weight", slope)], name)
        if isinstance(m, nn.MaxPool2d):
            if m.return_indices:
                raise RecuError(f"{name}: MaxPool2d with return_indices does not export")
            return g.node(
                "MaxPool", [x], name, kernel_shape=_pair(m.kernel_size),
                strides=_pair(m.stride), pads=_pads(tuple(_pair(m.padding))),
                dilations=_pair(m.dilation), ceil_mode=int(m.ceil_mode),
            )  # fmt: skip
        if isinstance(m, nn.AvgPool2d):
            if m.divisor_override is not None:
                raise RecuError(f"{name}: AvgPool2d with divisor_override does not export")
            return g.node(
                "AveragePool", [x], name, kernel_shape=_pair(m.kernel_size),
                strides=_pair(m.stride), pads=_pads(tuple(_pair(m.padding))),
                ceil_mode=int(m.ceil_mode), count_include_pad=int(m.count_include_pad),
            )  # fmt: skip
        if isinstance(m, nn.AdaptiveAvgPool2d):
            return self._global_pool(x, m.output_size, name)
        if isinstance(m, nn.Flatten):
            return self._flatten(x, n.args[0], m.start_dim, m.end_dim, name)
        if isinstance(m, nn.Linear):
            if self.rank(n.args[0]) != 2:
                raise RecuError(f"{name}: a Linear layer exports on [N, features] input only")
            ins = [x, g.const(f"{name}.weight", m.weight.detach().float())]
            if m.bias is not None:
                ins.append(g.const(f"{name}.bias", m.bias.detach().float()))
            return g.node("Gemm", ins, name, transB=1)
        raise RecuError(f"cannot export layer {name} ({type(m).__name__}) to ONNX yet")

    # -- functions and methods -------------------------------------------------------------

    def function(self, n: fx.Node) -> str:
        f, args, kw = n.target, n.args, n.kwargs
        name = n.name
        handlers: dict[Callable, Callable[[], str]] = {
            operator.add: lambda: self._add(n),
            operator.iadd: lambda: self._add(n),
            torch.add: lambda: self._add(n),
            operator.getitem: lambda: self._getitem(n),
            F.pad: lambda: self._pad(n),
            torch.flatten: lambda: self._flatten(
                self.value(args[0]), args[0], *_flatten_dims(args[1:], kw), name
            ),
            F.adaptive_avg_pool2d: lambda: self._global_pool(
                self.value(args[0]), args[1] if len(args) > 1 else kw["output_size"], name
            ),
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
            return self._flatten(self.value(args[0]), args[0], *_flatten_dims(args[1:], kw), name)
        if n.target in ("add", "add_", "__add__"):
            return self._add(n)
        if n.target in ("relu", "relu_"):
            return self.g.node("Relu", [self.value(args[0])], name)
        if n.target == "mean":
            dims = args[1] if len(args) > 1 else kw.get("dim")
            keep = bool(args[2] if len(args) > 2 else kw.get("keepdim", False))
            r = self.rank(args[0])
            axes = [int(d) % r for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
            return self.g.node(
                "ReduceMean", [self.value(args[0]), self.g.const(f"{name}.axes", np.array(axes))],
                name, keepdims=int(keep),
            )  # fmt: skip
        raise RecuError(f"cannot export tensor method .{n.target}() ({n.format_node()})")

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

    def _clip(self, x: str, name: str, lo: float, hi: float) -> str:
        g = self.g
        ins = [x, g.const(f"{name}.min", np.array(lo, np.float32)),
               g.const(f"{name}.max", np.array(hi, np.float32))]  # fmt: skip
        return g.node("Clip", ins, name)

    def _global_pool(self, x: str, size: Any, name: str) -> str:
        if size not in (1, (1, 1), [1, 1]):
            raise RecuError(f"{name}: only adaptive average pooling to 1x1 exports")
        return self.g.node("GlobalAveragePool", [x], name)

    def _flatten(self, x: str, src: Any, start: int, end: int, name: str) -> str:
        r = self.rank(src)
        if start % r != 1 or end % r != r - 1:
            raise RecuError(f"{name}: only flatten(1) ([N, C, H, W] -> [N, C*H*W]) exports")
        return self.g.node("Flatten", [x], name, axis=1)

    def _cat(self, n: fx.Node) -> str:
        tensors = n.args[0]
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
        r = self.rank(tensors[0])
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
        r = self.rank(args[0])
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


def metadata(spec: ModelSpec, fmt: str, packed: bool, extra: dict[str, Any] | None = None) -> dict:
    """What a user needs to feed the model, as string -> string metadata_props."""
    c, h, w = spec.input_size
    meta = {
        "recu.format": fmt,
        "recu.version": __version__,
        "recu.model": spec.full_name,
        "recu.num_classes": str(spec.num_classes),
        "recu.input_name": INPUT_NAME,
        "recu.input_shape": json.dumps(["batch", c, h, w]),
        "recu.input_layout": "NCHW float32, RGB in [0, 1] then (x - mean) / std per channel",
        "recu.mean": json.dumps(list(spec.mean)),
        "recu.std": json.dumps(list(spec.std)),
        "recu.interpolation": spec.interpolation,
        "recu.crop_pct": str(spec.crop_pct),
        "recu.output_name": OUTPUT_NAME,
        "recu.activation": "binary conv input: +1 where x >= act_threshold (0 if none), else -1",
        "recu.packed_weights": "true" if packed else "false",
    }
    return {**meta, **(extra or {})}


def build_model(
    model: nn.Module,
    spec: ModelSpec,
    conv_writer: BinaryConvWriter,
    *,
    fmt: str,
    extra_domains: dict[str, int] | None = None,
    extra_meta: dict[str, Any] | None = None,
) -> Any:
    """The ONNX ModelProto of `model` (a deploy model in eval mode)."""
    onnx = _onnx()
    model = model.eval()
    c, h, w = spec.input_size
    example = torch.zeros(2, c, h, w)
    gm = trace(model, example)
    nodes, inits = _Writer(gm, conv_writer).run()
    helper = onnx.helper
    graph = helper.make_graph(
        nodes,
        f"recu_{spec.name}",
        [helper.make_tensor_value_info(INPUT_NAME, onnx.TensorProto.FLOAT, ["batch", c, h, w])],
        [
            helper.make_tensor_value_info(
                OUTPUT_NAME, onnx.TensorProto.FLOAT, ["batch", spec.num_classes]
            )
        ],  # fmt: skip
        initializer=inits,
    )
    opsets = [helper.make_opsetid("", OPSET)]
    opsets += [helper.make_opsetid(d, v) for d, v in (extra_domains or {}).items()]
    proto = helper.make_model(
        graph, opset_imports=opsets, producer_name="recu", producer_version=__version__
    )
    proto.ir_version = IR_VERSION
    proto.doc_string = (
        f"recu ReCU binary network {spec.full_name}: feed '{INPUT_NAME}' NCHW float32 "
        f"[batch, {c}, {h}, {w}] normalised with mean {list(spec.mean)} and std "
        f"{list(spec.std)}; output '{OUTPUT_NAME}' [batch, {spec.num_classes}]."
    )
    packed = bool(getattr(conv_writer, "packed", False))
    helper.set_model_props(proto, metadata(spec, fmt, packed, extra_meta))
    return proto


def check(proto: Any) -> None:
    """onnx.checker with full shape inference; a failure is a bug in recu, said as such."""
    onnx = _onnx()
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:  # noqa: BLE001 - checker errors are ValidationError or shape errors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RecuError(f"the exported graph fails onnx.checker ({first}); please report this",
                        exit_code=1) from e  # fmt: skip
