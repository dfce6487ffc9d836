"""Fold alpha, bias and an eval BatchNorm into one per-channel multiply-add (prior-art 4.4).

Both engines compute an integer G per (pixel, output channel) and finish with
    out = m[o] * G + b[cls(y, x), o]
where cls groups the output pixels by which kernel taps fall on the zero padding. The
engines differ only in what G is (a popcount, or a {0,1} x {+-1} dot), so each one turns
the folded (scale, shift) and the padding correction into its own (m, b) here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from recu_cli.binarize.layers import BinaryConv2d
from recu_cli.errors import RecuError


def fold_epilogue(
    layer: BinaryConv2d, bn: nn.BatchNorm2d | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) in float64 with bn(alpha * dot + bias) == scale * dot + shift."""
    cout = layer.out_channels
    scale = layer.alpha.detach().reshape(-1).double().cpu()
    if scale.numel() != cout:
        raise RecuError(f"alpha of a binary conv has {scale.numel()} values for {cout} channels")
    shift = (
        layer.bias.detach().double().cpu()
        if layer.bias is not None
        else torch.zeros(cout, dtype=torch.float64)
    )
    if bn is None:
        return scale, shift
    if bn.num_features != cout:
        raise RecuError(f"BatchNorm has {bn.num_features} features but the conv has {cout} outputs")
    if bn.running_mean is None or bn.running_var is None:
        raise RecuError("BatchNorm without running statistics cannot be folded; keep it separate")
    inv = torch.rsqrt(bn.running_var.detach().double().cpu() + bn.eps)
    gamma = bn.weight.detach().double().cpu() if bn.weight is not None else torch.ones(cout)
    beta = bn.bias.detach().double().cpu() if bn.bias is not None else torch.zeros(cout)
    g = gamma.double() * inv
    return scale * g, (shift - bn.running_mean.detach().double().cpu()) * g + beta.double()


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


@dataclass(frozen=True)
class Border:
    """Per-pixel-class padding data for one input size."""

    ymap: torch.Tensor  # [Ho] int32 row class
    xmap: torch.Tensor  # [Wo] int32 column class
    pad_sum: torch.Tensor  # [nyc, nxc, Cout] float64: sum of w over the padded taps
    out_hw: tuple[int, int]


def border(tap_sum: torch.Tensor, hw: tuple[int, int], stride, padding, dilation) -> Border:
    """Sum of the +-1 weights over the out-of-image taps, per pixel class (C of prior-art 4.4).

    tap_sum: [Cout, kh, kw] float64, the weights summed over input channels.
    """
    kh, kw = tap_sum.shape[-2:]
    ymap, oy = border_classes(hw[0], kh, stride[0], padding[0], dilation[0])
    xmap, ox = border_classes(hw[1], kw, stride[1], padding[1], dilation[1])
    wsum = tap_sum.double()
    mask = (oy[:, None, :, None] | ox[None, :, None, :]).double()  # [nyc, nxc, kh, kw]
    pad_sum = torch.einsum("abkl,okl->abo", mask, wsum)
    return Border(ymap, xmap, pad_sum, (len(ymap), len(xmap)))


def pad_channels(t: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad the last dim to a multiple (the kernels read whole channel blocks)."""
    extra = -t.shape[-1] % multiple
    return torch.nn.functional.pad(t, (0, extra)) if extra else t
