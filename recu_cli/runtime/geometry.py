"""The geometry of one runtime conv, as one value instead of four tuples passed around."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ConvGeometry:
    """Where a binary conv's kernel taps fall: what the engines, the zero-padding tables and
    the C++ kernels need besides the weights. No groups: grouped convs are split into one
    engine conv per group before (runtime/api.py), so an engine conv always has groups 1."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]

    @classmethod
    def of(cls, conv: Any) -> ConvGeometry:
        """The geometry of a BinaryConv2d (or any conv with these four attributes)."""
        return cls(
            _pair(conv.kernel_size), _pair(conv.stride), _pair(conv.padding), _pair(conv.dilation)
        )

    def ints(self) -> tuple[int, ...]:
        """kh, kw, sh, sw, ph, pw, dh, dw: the order the xnor kernels take them in."""
        return (*self.kernel, *self.stride, *self.padding, *self.dilation)

    def onednn(self) -> tuple[list[int], list[int], list[int]]:
        """[stride], [padding], [dilation] as oneDNN's quantized conv ops take them."""
        return list(self.stride), list(self.padding), list(self.dilation)

    def __str__(self) -> str:
        return (
            f"kernel_size={self.kernel}, stride={self.stride}, padding={self.padding}, "
            f"dilation={self.dilation}"
        )


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))
