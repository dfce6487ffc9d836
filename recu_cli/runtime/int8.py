"""int8 engine: the binary conv as one int8 GEMM through torch._int_mm (oneDNN), pure PyTorch.

Activations enter as bits B = [x >= 0] in {0, 1}, written by one comparison straight into a
zero-padded NHWC int8 buffer (a bool view, no float im2col), and weights as +-1 int8. With
x_s = 2 B - 1 on real taps and 0 on padded ones:
    dot = 2 G - (Wtot - P),  G = sum B w,  Wtot = sum of all weights,  P = padded-tap sum,
so out = (2 s) G + s (P - Wtot) + t. Zero padding needs no extra pass: padded B is 0.
"""

from __future__ import annotations

import torch

from recu_cli.runtime.base import RuntimeConv
from recu_cli.runtime.fold import Border


class Int8Conv2d(RuntimeConv):
    """Binary conv as int8 im2col (built from a bool buffer) times +-1 int8 weights."""

    engine = "int8"

    def __init__(
        self,
        weight_sign: torch.Tensor,
        scale: torch.Tensor,
        shift: torch.Tensor,
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
    ) -> None:
        super().__init__(weight_sign, scale, shift, stride, padding, dilation)
        w = weight_sign.detach().float().cpu()
        w_total = w.double().sum(dim=(1, 2, 3))
        self.w_total = w_total
        # [K, Cout] with K ordered (ky, kx, c), matching the im2col below; done once at load.
        self.weight_i8 = (
            torch.where(w >= 0, 1, -1).to(torch.int8).permute(2, 3, 1, 0).reshape(-1, w.shape[0])
        ).contiguous()

    def make_table(
        self, b: Border, scale: torch.Tensor, shift: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        m = (2.0 * scale).float().contiguous()
        btab = scale * (b.pad_sum - self.w_total) + shift  # [nyc, nxc, Cout]
        bmap = btab[b.ymap.long()][:, b.xmap.long()].float().contiguous()  # [Ho, Wo, Cout]
        return m, bmap

    def run(self, x: torch.Tensor, dot_mode: bool) -> torch.Tensor:  # noqa: D102
        n, c, h, w = x.shape
        m, bmap = self.table((h, w), dot_mode)
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (
            self.kernel_size, self.stride, self.padding, self.dilation,
        )  # fmt: skip
        ho, wo = bmap.shape[:2]
        hp, wp = h + 2 * ph, w + 2 * pw
        bits = torch.zeros(n, hp, wp, c, dtype=torch.bool)
        torch.ge(x.permute(0, 2, 3, 1), 0, out=bits[:, ph : ph + h, pw : pw + w])
        cols = bits.view(torch.int8).as_strided(
            (n, ho, wo, kh, kw, c),
            (hp * wp * c, sh * wp * c, sw * c, dh * wp * c, dw * c, 1),
        )
        g = torch._int_mm(cols.reshape(n * ho * wo, kh * kw * c), self.weight_i8)
        out = torch.empty(n, ho, wo, self.out_channels, dtype=torch.float32)
        torch.addcmul(bmap, g.view(n, ho, wo, -1), m, out=out)
        return out.permute(0, 3, 1, 2)
