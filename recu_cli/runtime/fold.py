"""The epilogue of a binary conv, folded so the engines reproduce the float model exactly.

Every engine forms the integer dot product exactly, then finishes with the same float32
operations, in the same order, as the deploy form followed by its eval BatchNorm:
    v = float(dot) * alpha          (BinaryConv2d: conv * alpha)
    v = v + bias                    (if the conv has a bias)
    v = fma(v, a, c)                (ATen's eval BatchNorm: a = rsqrt(var + eps) * gamma,
                                     c = fma(-mean, a, beta), all float32)
so a folded BatchNorm costs one fused multiply-add per output and the outputs stay
bit-identical to bn(layer(x)). Folding the BN into one affine map of the dot instead
(m * popc + b(y, x), docs/method.md section 6) is cheaper by one multiply but rounds
differently, and in a BNN one last-bit difference flips a sign downstream: measured on
pretrained ResNet-20 and 64 CIFAR images, that moved one image's logits by 11 %. The BN
formula is checked against F.batch_norm on a probe when folding; if a torch build computes
it differently, the BN is not folded (the engine runs it as a separate op) rather than
folded inexactly.

Zero padding: pixels are grouped into classes by which kernel taps fall on the padding;
the weights summed over those taps (P) are precomputed per class (docs/method.md section 6).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from recu_cli.binarize.layers import BinaryConv2d
from recu_cli.errors import RecuError
from recu_cli.runtime.geometry import ConvGeometry


@dataclass(frozen=True, eq=False)
class Epilogue:
    """Per-output-channel float32 terms of out = fma(dot * alpha + bias, a, c)."""

    alpha: torch.Tensor  # [Cout]
    bias: torch.Tensor | None
    bn_a: torch.Tensor | None  # rsqrt(var + eps) * gamma
    bn_c: torch.Tensor | None  # fma(-mean, bn_a, beta)
    # (mean, var, gamma, beta, eps) for engines that apply the BN with F.batch_norm itself
    bn_params: tuple | None = None

    def slice(self, lo: int, hi: int) -> Epilogue:
        """The terms of output channels lo..hi-1 (one group of a grouped conv)."""

        def cut(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[lo:hi]

        params = self.bn_params
        if params is not None:
            params = (*(t[lo:hi] for t in params[:4]), params[4])
        return Epilogue(self.alpha[lo:hi], cut(self.bias), cut(self.bn_a), cut(self.bn_c), params)

    @staticmethod
    def identity(cout: int) -> Epilogue:
        """dot * 1: the exact integer dot products, as float32."""
        return Epilogue(torch.ones(cout), None, None, None)


def fma32(x: torch.Tensor, a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """float32 fused multiply-add, emulated in float64 (the product of two float32 is exact).

    Rounding the float64 sum to float32 can differ from one rounding only when the sum sits
    on a float32 halfway point (about 2^-29 of cases); the BN probe below catches that too.
    """
    return (x.double() * a.double() + c.double()).float()


def exact_bn_terms(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor, tuple] | None:
    """(a, c, params) with F.batch_norm(v) == fma(v, a, c) bit for bit, or None if not so here."""
    if bn.running_mean is None or bn.running_var is None:
        return None
    cout = bn.num_features
    mean = bn.running_mean.detach().float().cpu()
    var = bn.running_var.detach().float().cpu()
    gamma = bn.weight.detach().float().cpu() if bn.weight is not None else torch.ones(cout)
    beta = bn.bias.detach().float().cpu() if bn.bias is not None else torch.zeros(cout)
    a = torch.rsqrt(var + bn.eps) * gamma
    c = fma32(-mean, a, beta)
    gen = torch.Generator().manual_seed(0)
    probe = torch.randn(1, cout, 1, 256, generator=gen) * torch.logspace(-3, 3, 256)
    got = fma32(probe, a.view(1, -1, 1, 1), c.view(1, -1, 1, 1))
    params = (mean, var, gamma, beta, float(bn.eps))
    for layout in (torch.contiguous_format, torch.channels_last):  # ATen has a kernel for each
        want = F.batch_norm(probe.contiguous(memory_format=layout), mean, var, gamma, beta, False,
                            0.0, bn.eps)  # fmt: skip
        if not torch.equal(want, got):
            return None
    return a, c, params


def fold_epilogue(layer: BinaryConv2d, bn: nn.BatchNorm2d | None = None) -> Epilogue | None:
    """The epilogue of bn(layer(x)) (or layer(x)); None when bn cannot be folded exactly."""
    cout = layer.out_channels
    alpha = layer.alpha.detach().reshape(-1).float().cpu()
    if alpha.numel() != cout:
        raise RecuError(f"alpha of a binary conv has {alpha.numel()} values for {cout} channels")
    bias = layer.bias.detach().float().cpu() if layer.bias is not None else None
    if bn is None:
        return Epilogue(alpha, bias, None, None)
    if bn.num_features != cout:
        raise RecuError(f"BatchNorm has {bn.num_features} features but the conv has {cout} outputs")
    terms = exact_bn_terms(bn)
    if terms is None:
        return None
    return Epilogue(alpha, bias, *terms)


def border_classes(
    size: int, k: int, stride: int, pad: int, dil: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group output rows (or columns) by which taps fall outside the image.

    Returns (cls [out] int32, oob [ncls, k] bool). Interior rows share one class, so the
    table stays tiny and the correction costs nothing away from the border.
    """
    out = (size + 2 * pad - dil * (k - 1) - 1) // stride + 1
    if out <= 0:
        raise RecuError(f"input size {size} is smaller than the kernel footprint; enlarge it")
    ids: dict[tuple[bool, ...], int] = {}
    cls = []
    for o in range(out):
        sig = tuple(not 0 <= o * stride - pad + t * dil < size for t in range(k))
        cls.append(ids.setdefault(sig, len(ids)))
    oob = torch.tensor(list(ids), dtype=torch.bool).reshape(len(ids), k)
    return torch.tensor(cls, dtype=torch.int32), oob


@dataclass(frozen=True, eq=False)
class Border:
    """Per-pixel-class padding data for one input size."""

    ymap: torch.Tensor  # [Ho] int32 row class
    xmap: torch.Tensor  # [Wo] int32 column class
    pad_sum: torch.Tensor  # [nyc, nxc, Cout] float64: sum of w over the padded taps
    y_edge: torch.Tensor  # [nyc] bool: the row class has taps on the padding
    x_edge: torch.Tensor  # [nxc] bool
    out_hw: tuple[int, int]


def border(tap_sum: torch.Tensor, hw: tuple[int, int], geometry: ConvGeometry) -> Border:
    """Sum of the +-1 weights over the out-of-image taps, per pixel class (docs/method.md
    section 6: the border term P).

    tap_sum: [Cout, kh, kw] float64, the weights summed over input channels.
    """
    kh, kw = tap_sum.shape[-2:]
    g = geometry
    ymap, oy = border_classes(hw[0], kh, g.stride[0], g.padding[0], g.dilation[0])
    xmap, ox = border_classes(hw[1], kw, g.stride[1], g.padding[1], g.dilation[1])
    wsum = tap_sum.double()
    mask = (oy[:, None, :, None] | ox[None, :, None, :]).double()  # [nyc, nxc, kh, kw]
    pad_sum = torch.einsum("abkl,okl->abo", mask, wsum)
    return Border(ymap, xmap, pad_sum, oy.any(dim=1), ox.any(dim=1), (len(ymap), len(xmap)))


def pad_channels(t: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad the last dim to a multiple (the kernels read whole channel blocks)."""
    extra = -t.shape[-1] % multiple
    return torch.nn.functional.pad(t, (0, extra)) if extra else t
