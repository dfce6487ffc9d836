"""ONNX node building: unique names, initializers, and the nodes of one binary conv.

Shared by the standard-ONNX and the QONNX writers; the walk over a traced model that calls
these lives in onnx_walk.py, the per-layer nodes in onnx_layers.py.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from recu_cli.binarize.layers import BinaryConv2d
from recu_cli.errors import RecuError

OPSET = 18  # BitwiseAnd (packed weights) needs 18; onnxruntime, OpenVINO and qonnx run it
IR_VERSION = 9  # the IR of opset 18; newer IRs are refused by older runtimes
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
QONNX_DOMAIN = "qonnx.custom_op.general"
INT64_MAX = np.iinfo(np.int64).max


def onnx_lib() -> Any:
    """The onnx package, or one RecuError line saying which extra to install."""
    try:
        import onnx
    except ImportError as e:  # the command checks extras first; this guards library use
        raise RecuError(
            'exporting needs the onnx package; pip install "recu[export]"', exit_code=1
        ) from e
    return onnx


def unique_name(base: str, taken: set[str]) -> str:
    """base, or base_1, base_2, ...: the first name not yet in the graph (then taken)."""
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


class GraphBuilder:
    """Accumulates ONNX nodes and initializers with unique names."""

    def __init__(self) -> None:
        self.onnx = onnx_lib()
        self.nodes: list = []
        self.inits: list = []
        self._names: set[str] = set()
        self._shared: dict[str, str] = {}

    def fresh(self, base: str) -> str:
        return unique_name(base, self._names)

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


def shape_const(g: GraphBuilder, dims: list[int]) -> str:
    """One int64 shape initializer per distinct shape."""
    return g.shared("shape_" + "x".join(str(int(d)) for d in dims), np.array(dims, np.int64))


def pads(padding: tuple[int, int]) -> list[int]:
    """torch's (h, w) padding as ONNX's [h_begin, w_begin, h_end, w_end]."""
    return [int(padding[0]), int(padding[1]), int(padding[0]), int(padding[1])]


def pair(v: int | tuple[int, ...]) -> list[int]:
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
        col = g.node("Reshape", [src, shape_const(g, [o, nbytes, 1])], f"{name}/bits_col")
        shifts = g.shared("bit_shifts_u8", np.arange(7, -1, -1, dtype=np.uint8))
        shifted = g.node("BitShift", [col, shifts], f"{name}/bits_shift", direction="RIGHT")
        one_u8 = g.shared("one_u8", np.array(1, np.uint8))
        bit = g.node("BitwiseAnd", [shifted, one_u8], f"{name}/bits_and")
        on = g.node("Cast", [bit], f"{name}/bits_bool", to=int(g.onnx.TensorProto.BOOL))
        one = g.shared("one_f32", np.array(1.0, np.float32))
        minus = g.shared("minus_one_f32", np.array(-1.0, np.float32))
        pm = g.node("Where", [on, one, minus], f"{name}/bits_pm1")  # [O, bytes, 8]
        if k != nbytes * 8:  # drop each row's spare low bits of the last byte
            rows = g.node("Reshape", [pm, shape_const(g, [o, nbytes * 8])], f"{name}/bits_rows")
            pm = g.node(
                "Slice",
                [rows, g.shared("zero_i64_1", np.array([0], np.int64)),
                 g.shared(f"i64_{k}", np.array([k], np.int64)),
                 g.shared("one_i64_1", np.array([1], np.int64))],
                f"{name}/bits_trim",
            )  # fmt: skip
        shape = shape_const(g, list(m.weight_sign.shape))
        return g.node("Reshape", [pm, shape], f"{name}/weight_pm1")

    def conv_attrs(self, m: BinaryConv2d) -> dict[str, Any]:
        kh, kw = m.kernel_size
        return {
            "kernel_shape": [kh, kw],
            "strides": pair(m.stride),
            "pads": pads(m.padding),
            "dilations": pair(m.dilation),
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
