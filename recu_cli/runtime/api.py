"""The runtime's public entry points: pick an engine, swap binary convs, fold their BatchNorm."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import pairwise

import torch
from torch import nn

from recu_cli.binarize.layers import BinaryConv2d
from recu_cli.errors import RecuError
from recu_cli.runtime.base import GroupedConv, RuntimeConv, WithBatchNorm
from recu_cli.runtime.fold import Epilogue, fold_epilogue
from recu_cli.runtime.geometry import ConvGeometry

FP_LAYER_MODES = ("exact", "int8")  # how the full-precision layers run (fp_int8.py)

ENGINES = ("torch", "xnor", "int8")
# Children (conv, bn) that converted ResNet blocks apply back to back: bnN(convN(x)).
FOLD_PAIRS = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))


def check_engine(engine: str) -> str:
    if engine not in ENGINES:
        raise RecuError(f"unknown runtime engine {engine!r}; choose one of {', '.join(ENGINES)}")
    return engine


def check_fp_layers(mode: str) -> str:
    if mode not in FP_LAYER_MODES:
        raise RecuError(f"--fp-layers must be one of {', '.join(FP_LAYER_MODES)}, not {mode!r}")
    return mode


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
    from recu_cli.runtime.int8 import onednn_available

    if onednn_available():
        return True, "+-1 int8 conv (oneDNN u8 x s8, fp32 output)"
    if not hasattr(torch, "_int_mm"):
        return False, f"torch {torch.__version__} has no int8 conv or torch._int_mm; upgrade torch"
    try:
        a = torch.ones(1, 8, dtype=torch.int8)
        torch._int_mm(a, torch.ones(8, 8, dtype=torch.int8))
    except RuntimeError as e:
        return False, f"torch._int_mm does not run on this CPU build ({e})"
    return True, "+-1 int8 GEMM (int8 im2col + torch._int_mm)"


def _engine_conv(engine: str, w: torch.Tensor, epi: Epilogue, layer: BinaryConv2d) -> RuntimeConv:
    geometry = ConvGeometry.of(layer)
    if engine == "xnor":
        from recu_cli.runtime.xnor import XnorConv2d

        return XnorConv2d(w, epi, geometry)
    from recu_cli.runtime.int8 import Int8Conv2d

    return Int8Conv2d(w, epi, geometry)


def fast_conv(layer: BinaryConv2d, engine: str, bn: nn.BatchNorm2d | None = None) -> nn.Module:
    """A module computing bn(layer(x)) (or layer(x)) in eval mode with the given engine.

    The result is bit-identical to the float deploy form (fold.py says how); it also has
    integer_dot(x), the exact integer dot products, for bit-exactness checks.
    """
    check_engine(engine)
    if not isinstance(layer, BinaryConv2d):
        raise RecuError(f"fast_conv needs a BinaryConv2d, got {type(layer).__name__}")
    if engine == "torch":
        mods = [copy.deepcopy(layer)] + ([copy.deepcopy(bn)] if bn is not None else [])
        return nn.Sequential(*mods).eval()
    w = layer.weight_sign.detach().float().cpu()
    if not bool(((w == 1) | (w == -1)).all()):
        raise RecuError("a BinaryConv2d holds weights other than +-1; rebuild it with to_deploy")
    epi = fold_epilogue(layer, bn)
    tail = None
    if epi is None:  # this torch computes eval BN differently: run it as its own op
        epi, tail = fold_epilogue(layer, None), copy.deepcopy(bn)
    assert epi is not None  # fold_epilogue without a BN always succeeds
    g, co = layer.groups, layer.out_channels // layer.groups
    beta = getattr(layer, "act_threshold", None)
    if g == 1:
        conv = _engine_conv(engine, w, epi, layer)
        conv.set_threshold(beta)
        mod: nn.Module = conv
    else:
        ci = layer.in_channels // g
        parts = [(w[i * co : (i + 1) * co], epi.slice(i * co, (i + 1) * co)) for i in range(g)]
        convs = [_engine_conv(engine, wg, eg, layer) for wg, eg in parts]
        for i, conv in enumerate(convs):
            conv.set_threshold(None if beta is None else beta[i * ci : (i + 1) * ci])
        mod = GroupedConv(convs)
    return mod if tail is None else WithBatchNorm(mod, tail)


def _foldable(bn: nn.Module | None) -> bool:
    return isinstance(bn, nn.BatchNorm2d) and bn.running_mean is not None


@dataclass(frozen=True)
class Site:
    """One binary conv in a model and the BatchNorm applied right after it (if foldable)."""

    name: str  # qualified name of the conv, e.g. "layer1.0.conv1"
    parent: nn.Module
    conv_key: str
    bn_key: str | None

    @property
    def conv(self) -> BinaryConv2d:
        return self.parent._modules[self.conv_key]  # type: ignore[return-value]

    @property
    def bn(self) -> nn.BatchNorm2d | None:
        return self.parent._modules[self.bn_key] if self.bn_key else None  # type: ignore[return-value]


def _pairs(parent: nn.Module) -> list[tuple[str, str]]:
    """(conv, bn) child names whose forward is bn(conv(x)) by construction.

    The converted ResNet blocks (BiRealBasicBlock, BiRealBottleneck) apply bnN to convN's
    output directly; an nn.Sequential applies each child to the previous one's output.
    """
    pairs = list(FOLD_PAIRS)
    if isinstance(parent, nn.Sequential):
        keys = list(parent._modules)
        pairs += list(pairwise(keys))
    return pairs


def binary_sites(model: nn.Module) -> list[Site]:
    """Every BinaryConv2d of `model` (module order), with the BatchNorm that can fold into it."""
    sites: list[Site] = []
    claimed: set[int] = set()
    for pname, parent in model.named_modules():
        kids = parent._modules
        prefix = f"{pname}." if pname else ""
        for ck, bk in _pairs(parent):
            conv, bn = kids.get(ck), kids.get(bk)
            if (
                isinstance(conv, BinaryConv2d)
                and _foldable(bn)
                and id(conv) not in claimed
                and id(bn) not in claimed
            ):
                sites.append(Site(prefix + ck, parent, ck, bk))
                claimed.update((id(conv), id(bn)))
        for ck, child in kids.items():
            if isinstance(child, BinaryConv2d) and id(child) not in claimed:
                sites.append(Site(prefix + ck, parent, ck, None))
                claimed.add(id(child))
    return sites


def to_runtime(
    model: nn.Module,
    engine: str,
    *,
    fold_bn: bool = True,
    channels_last: bool = False,
    fuse: bool = True,
    fp_layers: str = "exact",
    calibration: Iterable[torch.Tensor] | None = None,
) -> nn.Module:
    """A deep copy on the CPU, in eval mode, with every BinaryConv2d run by `engine`.

    Its outputs are bit-identical to the float model's (fold.py says why).
    fold_bn: a BatchNorm applied right after a binary conv (children convN -> bnN of a block,
      or neighbours in an nn.Sequential) joins the conv's epilogue and becomes nn.Identity.
    channels_last: also convert the model to NHWC: the float glue layers (stem, max-pool,
      shortcuts) run faster, and the outputs then equal the float model's in NHWC, which
      can differ from its NCHW outputs in the last bits (a different float summation order
      in oneDNN's convs); in a BNN such a bit can flip a sign downstream.
    fuse: with "xnor", channels_last and fold_bn, run whole Bi-Real basic blocks and the
      ResNet stem's BatchNorm / activation / max-pool in fused C++ kernels (fused.py): the
      fast path, still bit-identical to the float model in NHWC.
    fp_layers: "exact" keeps the full-precision layers (stem, 1x1 shortcuts, classifier) as
      they are; "int8" runs them through oneDNN int8 (fp_int8.py), calibrated on the model
      inputs in `calibration`: faster, no longer exact.
    "torch" returns the copy unchanged (the float deploy form), whatever the flags.
    """
    check_engine(engine)
    check_fp_layers(fp_layers)
    if not any(isinstance(m, BinaryConv2d) for m in model.modules()):
        raise RecuError(
            "the model has no BinaryConv2d layers; convert it first (recu convert) or load a "
            "packed checkpoint"
        )
    if engine != "torch":
        ok, why = available(engine)
        if not ok:
            raise RecuError(f"engine {engine!r} is not available: {why}", exit_code=1)
    out = copy.deepcopy(model).cpu().eval()
    if engine == "torch":
        return out
    with torch.no_grad():
        for site in binary_sites(out):
            bn = site.bn if fold_bn else None
            site.parent._modules[site.conv_key] = fast_conv(site.conv, engine, bn)
            if bn is not None:
                site.parent._modules[site.bn_key] = nn.Identity()  # type: ignore[index]
    if channels_last:
        out = out.to(memory_format=torch.channels_last)
    if fp_layers == "int8":
        from recu_cli.runtime.fp_int8 import quantize_float_layers

        if calibration is None:
            raise RecuError("fp_layers='int8' needs calibration images (recu: --data DIR)")
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        quantize_float_layers(out, (x.contiguous(memory_format=fmt) for x in calibration))
    if channels_last and fuse and fold_bn and engine == "xnor":
        from recu_cli.runtime.fused import fuse_model

        fuse_model(out)
    return out.eval()
