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

A layer or function outside this list is one RecuError line naming it. This module puts
the model together; onnx_nodes.py builds nodes, onnx_layers.py writes each layer and
onnx_walk.py walks the traced graph.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from recu_cli import __version__
from recu_cli.errors import RecuError
from recu_cli.export.onnx_nodes import (
    INPUT_NAME,
    IR_VERSION,
    OPSET,
    OUTPUT_NAME,
    QONNX_DOMAIN,
    BinaryConvWriter,
    GraphBuilder,
    onnx_lib,
    pack_bits,
)
from recu_cli.export.onnx_walk import trace, write_graph
from recu_cli.spec import ModelSpec

__all__ = [
    "OPSET",
    "QONNX_DOMAIN",
    "BinaryConvWriter",
    "GraphBuilder",
    "build_model",
    "check",
    "metadata",
    "pack_bits",
    "trace",
]


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
    onnx = onnx_lib()
    model = model.eval()
    c, h, w = spec.input_size
    example = torch.zeros(2, c, h, w)
    gm = trace(model, example)
    nodes, inits = write_graph(gm, conv_writer)
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
    onnx = onnx_lib()
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:  # noqa: BLE001 - checker errors are ValidationError or shape errors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RecuError(f"the exported graph fails onnx.checker ({first}); please report this",
                        exit_code=1) from e  # fmt: skip
