"""The ONNX nodes of each full-precision layer recu exports (Conv, BatchNormalization,
Gemm, activations, pooling, flatten), one function per layer kind.

Binary convs are BinaryConvWriter's (onnx_nodes.py); the walk that calls these is
onnx_walk.py. Functions take the layer's input name and return the output's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from recu_cli.errors import RecuError
from recu_cli.export.onnx_nodes import GraphBuilder, pads, pair


def write_layer(g: GraphBuilder, m: nn.Module, x: str, name: str, rank: Callable[[], int]) -> str:
    """The nodes of layer `m` on input `x`; `rank` gives the input's rank where needed."""
    if isinstance(m, (nn.Identity, nn.Dropout)):
        return x
    if isinstance(m, nn.Conv2d):
        return _conv(g, m, x, name)
    if isinstance(m, nn.BatchNorm2d):
        return _batch_norm(g, m, x, name)
    if isinstance(m, nn.ReLU):
        return g.node("Relu", [x], name)
    if isinstance(m, (nn.Hardtanh, nn.ReLU6)):
        lo, hi = (0.0, 6.0) if isinstance(m, nn.ReLU6) else (m.min_val, m.max_val)
        return clip(g, x, name, lo, hi)
    if isinstance(m, nn.PReLU):
        slope = m.weight.detach().float()
        slope = slope.reshape(-1, 1, 1) if slope.numel() > 1 else slope.reshape(1)
        return g.node("PRelu", [x, g.const(f"{name}.weight", slope)], name)
    if isinstance(m, nn.MaxPool2d):
        if m.return_indices:
            raise RecuError(f"{name}: MaxPool2d with return_indices does not export")
        return _pool(g, "MaxPool", m, x, name, dilations=pair(m.dilation))
    if isinstance(m, nn.AvgPool2d):
        if m.divisor_override is not None:
            raise RecuError(f"{name}: AvgPool2d with divisor_override does not export")
        return _pool(g, "AveragePool", m, x, name, count_include_pad=int(m.count_include_pad))
    if isinstance(m, nn.AdaptiveAvgPool2d):
        return global_pool(g, x, m.output_size, name)
    if isinstance(m, nn.Flatten):
        return flatten(g, x, rank(), m.start_dim, m.end_dim, name)
    if isinstance(m, nn.Linear):
        if rank() != 2:
            raise RecuError(f"{name}: a Linear layer exports on [N, features] input only")
        return g.node("Gemm", _with_bias(g, m, x, name), name, transB=1)
    raise RecuError(f"cannot export layer {name} ({type(m).__name__}) to ONNX yet")


def _with_bias(g: GraphBuilder, m: nn.Conv2d | nn.Linear, x: str, name: str) -> list[str]:
    """Inputs [x, weight(, bias)] of a Conv or Gemm node."""
    ins = [x, g.const(f"{name}.weight", m.weight.detach().float())]
    if m.bias is not None:
        ins.append(g.const(f"{name}.bias", m.bias.detach().float()))
    return ins


def _conv(g: GraphBuilder, m: nn.Conv2d, x: str, name: str) -> str:
    if m.padding_mode != "zeros" or isinstance(m.padding, str):
        raise RecuError(f"{name}: only numeric zero padding exports (got {m.padding!r})")
    return g.node(
        "Conv", _with_bias(g, m, x, name), name, kernel_shape=list(m.kernel_size),
        strides=pair(m.stride), pads=pads(m.padding), dilations=pair(m.dilation),
        group=int(m.groups),
    )  # fmt: skip


def _batch_norm(g: GraphBuilder, m: nn.BatchNorm2d, x: str, name: str) -> str:
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


def _pool(
    g: GraphBuilder, op: str, m: nn.MaxPool2d | nn.AvgPool2d, x: str, name: str, **attrs: Any
) -> str:
    """MaxPool / AveragePool with the attributes both share, plus each one's own."""
    return g.node(
        op, [x], name, kernel_shape=pair(m.kernel_size), strides=pair(m.stride),
        pads=pads(tuple(pair(m.padding))), ceil_mode=int(m.ceil_mode), **attrs,
    )  # fmt: skip


def clip(g: GraphBuilder, x: str, name: str, lo: float, hi: float) -> str:
    ins = [x, g.const(f"{name}.min", np.array(lo, np.float32)),
           g.const(f"{name}.max", np.array(hi, np.float32))]  # fmt: skip
    return g.node("Clip", ins, name)


def global_pool(g: GraphBuilder, x: str, size: Any, name: str) -> str:
    if size not in (1, (1, 1), [1, 1]):
        raise RecuError(f"{name}: only adaptive average pooling to 1x1 exports")
    return g.node("GlobalAveragePool", [x], name)


def flatten(g: GraphBuilder, x: str, r: int, start: int, end: int, name: str) -> str:
    if start % r != 1 or end % r != r - 1:
        raise RecuError(f"{name}: only flatten(1) ([N, C, H, W] -> [N, C*H*W]) exports")
    return g.node("Flatten", [x], name, axis=1)
