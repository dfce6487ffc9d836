"""XNOR-popcount engine: sign bits packed 64 channels per word, C++ kernels (csrc/xnor.cpp).

With bit 1 = +1 and zero words on the padded border, the popcount G of (activation XOR
weight) gives dot = K + P - 2 G, where P is the sum of the weights over the padded taps
(read as -1 but they must count 0), precomputed per pixel class. The kernel forms that dot
exactly in integers and applies the epilogue of fold.py in registers before the store.
"""

from __future__ import annotations

import torch

from recu_cli.errors import RecuError
from recu_cli.runtime import ext
from recu_cli.runtime.base import RuntimeConv
from recu_cli.runtime.fold import Border, Epilogue, pad_channels
from recu_cli.runtime.geometry import ConvGeometry

BLOCK = 32  # output channels per weight block in the kernel
MAX_TAPS = 64  # kh * kw, the kernel's tap-offset table


class XnorConv2d(RuntimeConv):
    """Binary conv on packed bits; weights repacked once here, activations packed per call."""

    engine = "xnor"

    def __init__(
        self, weight_sign: torch.Tensor, epilogue: Epilogue, geometry: ConvGeometry,
        isa: str = "auto",
    ) -> None:  # fmt: skip
        super().__init__(weight_sign, epilogue, geometry)
        kh, kw = geometry.kernel
        if kh * kw > MAX_TAPS:
            raise RecuError(
                f"the xnor kernels handle up to {MAX_TAPS} kernel taps, not "
                f"{kh}x{kw}; use the int8 engine"
            )
        ops = ext.ops()  # builds the kernels now (or raises RecuError), not at the first call
        self.isa = isa
        self._isa_code = ext.isa_code(isa)
        w = weight_sign.detach().float().cpu().contiguous()
        self.packed_weight = ops.pack_weights(w)  # [CB, kh, kw, CW, 32] int64
        self._fwd_args, self._dot_args = _padded(self.epilogue), _padded(self.dot_epilogue)

    def make_table(self, b: Border) -> tuple:
        ktab = pad_channels((self.k + b.pad_sum).round().long(), BLOCK).contiguous()
        return ktab, b.ymap, b.xmap

    def run(self, x: torch.Tensor, dot: bool) -> torch.Tensor:  # noqa: D102
        x = self.as_float(x)
        ktab, ymap, xmap = self.table((x.shape[-2], x.shape[-1]))
        args = self._dot_args if dot else self._fwd_args
        return ext.ops().conv(
            x, self.packed_weight, self.out_channels, *self.geometry.ints(), ktab, *args, ymap,
            xmap, self._isa_code,
        )  # fmt: skip

    def extra_repr(self) -> str:  # noqa: D102
        return super().extra_repr() + f", isa={self.isa}"


def _padded(e: Epilogue) -> tuple[torch.Tensor | None, ...]:
    """The epilogue vectors zero-padded to whole 32-channel blocks, as the kernel reads them."""

    def pad(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else pad_channels(t.float(), BLOCK).contiguous()

    return pad(e.alpha), pad(e.bias), pad(e.bn_a), pad(e.bn_c)
