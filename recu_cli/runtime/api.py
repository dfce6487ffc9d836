"""The runtime's public entry points: pick an engine, swap binary convs, fold their BatchNorm."""

from __future__ import annotations

import copy

import torch
from torch import nn

from recu_cli.binarize.layers import BinaryConv2d
from recu_cli.errors import RecuError
from recu_cli.runtime.base import GroupedConv, RuntimeConv
from recu_cli.runtime.fold import fold_epilogue

ENGINES = ("torch", "xnor", "int8")
# Children (conv, bn) that converted ResNet blocks apply back to back: bnN(convN(x)).
FOLD_PAIRS = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))


def check_engine(engine: str) -> str:
    if engine not in ENGINES:
        raise RecuError(f"unknown runtime engine {engine!r}; choose one of {', '.join(ENGINES)}")
    return engine


def available(engine: str) -> tuple[bool, str]:
    """Can this engine run here, and a short reason (what it uses, or why not)."""
    check_engine(engine)
    if engine == "torch":
        return True, "float32 deploy form (F.conv2d)"
    if engine == "xnor":
        from recu_cli.runtime import ext

        try:
            return True, f"C++ XNOR-popcount kernels ({ext.detected_isa()})"
        except RecuError as e:
            return False, str(e)
    if not hasattr(torch, "_int_mm"):
        return False, f"torch {torch.__version__} has no torch._int_mm; upgrade torch (>= 2.3)"
    try:
        a = torch.ones(1, 8, dtype=torch.int8)
        torch._int_mm(a, torch.ones(8, 8, dtype=torch.int8))
    except RuntimeError as e:
        return False, f"torch._int_mm does not run on this CPU build ({e})"
    return True, "+-1 int8 GEMM (torch._int_mm, oneDNN)"


def _engine_conv(engine: str, w: torch.Tensor, scale, shift, layer: BinaryConv2d) -> RuntimeConv:
    geometry = (layer.stride, layer.padding, layer.dilation)
    if engine == "xnor":
        from recu_cli.runtime.xnor import XnorConv2d

        return XnorConv2d(w, scale, shift, *geometry)
    from recu_cli.runtime.int8 import Int8Conv2d

    return Int8Conv2d(w, scale, shift, *geometry)


def fast_conv(layer: BinaryConv2d, engine: str, bn: nn.BatchNorm2d | None = None) -> nn.Module:
    """A module computing bn(layer(x)) (or layer(x)) in eval mode with the given engine."""
    check_engine(engine)
    if not isinstance(layer, BinaryConv2d):
        raise RecuError(f"fast_conv needs a BinaryConv2d, got {type(layer).__name__}")
    if engine == "torch":
        mods = [copy.deepcopy(layer)] + ([copy.deepcopy(bn)] if bn is not None else [])
        return nn.Sequential(*mods).eval()
    w = layer.weight_sign.detach().float().cpu()
    if not bool(((w == 1) | (w == -1)).all()):
        raise RecuError("a BinaryConv2d holds weights other than +-1; rebuild it with to_deploy")
    scale, shift = fold_epilogue(layer, bn)
    g = layer.groups
    if g == 1:
        return _engine_conv(engine, w, scale, shift, layer)
    co = layer.out_channels // g
    parts = [
        _engine_conv(
            engine, w[i * co : (i + 1) * co], scale[i * co : (i + 1) * co],
            shift[i * co : (i + 1) * co], layer,
        )  # fmt: skip
        for i in range(g)
    ]
    return GroupedConv(parts)


def _foldable(bn: nn.Module | None) -> bool:
    return isinstance(bn, nn.BatchNorm2d) and bn.running_mean is not None


def to_runtime(model: nn.Module, engine: str) -> nn.Module:
    """A deep copy in eval mode with every BinaryConv2d run by `engine`.

    A BatchNorm that directly follows a binary conv in a block (children convN -> bnN) is
    folded into the conv's epilogue and replaced by nn.Identity. "torch" returns the copy
    unchanged (the float deploy form).
    """
    check_engine(engine)
    if not any(isinstance(m, BinaryConv2d) for m in model.modules()):
        raise RecuError(
            "the model has no BinaryConv2d layers; convert it first (recu convert) or load a "
            "packed checkpoint"
        )
    if engine != "torch":
        ok, why = available(engine)
        if not ok:
            raise RecuError(f"engine {engine!r} is not available: {why}", exit_code=1)
    out = copy.deepcopy(model).eval()
    if engine == "torch":
        return out
    with torch.no_grad():
        for parent in list(out.modules()):
            kids = parent._modules
            for conv_name, bn_name in FOLD_PAIRS:
                conv, bn = kids.get(conv_name), kids.get(bn_name)
                if isinstance(conv, BinaryConv2d) and _foldable(bn):
                    kids[conv_name] = fast_conv(conv, engine, bn)
                    kids[bn_name] = nn.Identity()
        for parent in list(out.modules()):
            for name, child in list(parent._modules.items()):
                if isinstance(child, BinaryConv2d):
                    parent._modules[name] = fast_conv(child, engine)
    return out.eval()
