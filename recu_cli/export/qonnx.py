"""QONNX graph: the standard-ONNX graph with BipolarQuant nodes where the values are binary.

BipolarQuant(x, scale) (domain qonnx.custom_op.general) is +scale where x >= 0, else
-scale: sign(0) = +1, as in recu. A binary conv becomes, by default (exact):
    BipolarQuant(x - thr, 1) -> Conv(., BipolarQuant(W+-1, 1)) -> Mul(alpha) (-> Add(bias))
or, with alpha_in_quant (Brevitas' export_qonnx layout, scale = alpha per output channel):
    BipolarQuant(x - thr, 1) -> Conv(., BipolarQuant(W+-1, alpha[O,1,1,1])) (-> Add(bias))
The second is not exact: the conv then sums alpha-scaled terms, which rounds differently
from alpha * (exact integer dot), and in a BNN a last-bit difference flips a sign
downstream (measured on pretrained ResNet-20: logits move by up to 0.3, same argmax).
FINN's own flow moves that scale out of the quantizer into a Mul anyway.
Everything else (BatchNormalization, Add shortcuts, Slice/Pad, fp layers) is the same
graph as the ONNX export. Executed and checked with the `qonnx` package: the batch fixed
and the shapes inferred (`run`), then `qonnx.core.onnx_exec.execute_onnx`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from recu_cli.binarize.layers import BinaryConv2d
from recu_cli.export.onnx_graph import (
    QONNX_DOMAIN,
    BinaryConvWriter,
    GraphBuilder,
    build_model,
)
from recu_cli.spec import ModelSpec

QONNX_OPSET = 1


class BipolarConvWriter(BinaryConvWriter):
    """Binary conv with BipolarQuant on activations (scale 1) and weights (scale 1 or alpha)."""

    def __init__(self, alpha_in_quant: bool = False) -> None:
        super().__init__(packed=False)
        self.alpha_in_quant = alpha_in_quant

    def activation(self, g: GraphBuilder, x: str, name: str, thr: torch.Tensor | None) -> str:
        if thr is not None:  # x - thr >= 0 exactly where x >= thr (IEEE, no flush to zero)
            t = g.const(f"{name}.act_threshold", thr.detach().float().reshape(1, -1, 1, 1))
            x = g.node("Sub", [x, t], f"{name}/shift")
        one = g.shared("one_f32", np.array(1.0, np.float32))
        return g.node("BipolarQuant", [x, one], f"{name}/act_quant", domain=QONNX_DOMAIN)

    def write(self, g: GraphBuilder, x: str, m: BinaryConv2d, name: str) -> str:  # noqa: D102
        xb = self.activation(g, x, name, getattr(m, "act_threshold", None))
        w = g.const(f"{name}.weight_sign", m.weight_sign.detach().float())
        alpha = m.alpha.detach().float()
        scale = (
            g.const(f"{name}.alpha", alpha.reshape(-1, 1, 1, 1))
            if self.alpha_in_quant
            else g.shared("one_f32", np.array(1.0, np.float32))
        )
        wq = g.node("BipolarQuant", [w, scale], f"{name}/weight_quant", domain=QONNX_DOMAIN)
        y = g.node("Conv", [xb, wq], f"{name}/conv", **self.conv_attrs(m))
        if not self.alpha_in_quant:
            a = g.const(f"{name}.alpha", alpha.reshape(1, -1, 1, 1))
            y = g.node("Mul", [y, a], f"{name}/alpha")
        if m.bias is not None:
            b = m.bias.detach().float().reshape(1, -1, 1, 1)
            y = g.node("Add", [y, g.const(f"{name}.bias", b)], f"{name}/bias")
        return y


def build(model: nn.Module, spec: ModelSpec, alpha_in_quant: bool = False) -> Any:
    """The QONNX ModelProto of a deploy model."""
    layout = "weight BipolarQuant scale = alpha" if alpha_in_quant else "Mul(alpha) after Conv"
    return build_model(
        model, spec, BipolarConvWriter(alpha_in_quant), fmt="qonnx",
        extra_domains={QONNX_DOMAIN: QONNX_OPSET},
        extra_meta={"recu.qonnx_bipolar": "BipolarQuant(x, s) = +s where x >= 0 else -s",
                    "recu.qonnx_alpha": layout},
    )  # fmt: skip


def run(path: Path, x: np.ndarray) -> np.ndarray:
    """Logits from the qonnx executor, the batch fixed to x's and the shapes inferred.

    Not qonnx's `cleanup_model`: its constant folding rebuilds the model wrapper once per
    node (82 s for the --exact-rounding resnet20 graph against 4 s here) and changes no
    logit (measured bit-identical on both graphs); FINN users run it in their own flow."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.transformation.infer_shapes import InferShapes

    model = ModelWrapper(str(path))
    iname = model.graph.input[0].name
    model.set_tensor_shape(iname, [int(x.shape[0]), *model.get_tensor_shape(iname)[1:]])
    model = model.transform(InferShapes())
    return np.asarray(execute_onnx(model, {iname: x})[model.graph.output[0].name])
