"""XNOR-popcount engine: sign bits packed 64 channels per word, C++ kernels (csrc/xnor.cpp).

With bit 1 = +1 and zero words on the padded border, the kernel's popcount G of
(activation XOR weight) gives dot = K - 2 G + P, where P is the sum of the weights over the
padded taps (those read as -1 but must count 0). So out = (-2 s) G + s (K + P) + t.
"""

from __future__ import annotations

import torch

from recu_cli.runtime import ext
from recu_cli.runtime.base import RuntimeConv
from recu_cli.runtime.fold import Border, pad_channels

BLOCK = 32  # output channels per weight block in the kernel


class XnorConv2d(RuntimeConv):
    """Binary conv on packed bits; weights repacked once here, activations packed per call."""

    engine = "xnor"

    def __init__(
        self,
        weight_sign: torch.Tensor,
        scale: torch.Tensor,
        shift: torch.Tensor,
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
        isa: str = "auto",
    ) -> None:
        super().__init__(weight_sign, scale, shift, stride, padding, dilation)
        self._ops = ext.ops()
        self.isa = isa
        self._isa_code = ext.isa_code(isa)
        w = weight_sign.detach().float().cpu().contiguous()
        self.packed_weight = self._ops.pack_weights(w)  # [CB, kh, kw, CW, 32] int64

    def make_table(
        self, b: Border, scale: torch.Tensor, shift: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        m = pad_channels((-2.0 * scale).float(), BLOCK).contiguous()
        btab = scale * (self.k + b.pad_sum) + shift  # [nyc, nxc, Cout]
        return m, pad_channels(btab.float(), BLOCK).contiguous(), b.ymap, b.xmap

    def run(self, x: torch.Tensor, dot_mode: bool) -> torch.Tensor:  # noqa: D102
        x = self.as_float(x)
        m, btab, ymap, xmap = self.table((x.shape[-2], x.shape[-1]), dot_mode)
        return self._ops.conv(
            x, self.packed_weight, self.out_channels, *self.kernel_size, *self.stride,
            *self.padding, *self.dilation, m, btab, ymap, xmap, self._isa_code,
        )  # fmt: skip

    def extra_repr(self) -> str:  # noqa: D102
        return super().extra_repr() + f", isa={self.isa}"
