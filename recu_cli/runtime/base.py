"""What every runtime conv shares: geometry, the folded epilogue, cached border tables."""

from __future__ import annotations

import torch
from torch import nn

from recu_cli.runtime.fold import Border, border


class RuntimeConv(nn.Module):
    """A binary conv + folded epilogue; subclasses supply the integer kernel.

    `forward(x)` equals bn(layer(x)) up to float rounding of the epilogue; `integer_dot(x)`
    returns the exact integer dot products sum(sign(x) * w) with zero padding, as float,
    which must equal F.conv2d(sign_pos(x), weight_sign) bit for bit.
    """

    engine = "?"

    def __init__(
        self,
        weight_sign: torch.Tensor,
        scale: torch.Tensor,
        shift: torch.Tensor,
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
    ) -> None:
        super().__init__()
        w = weight_sign.detach().float().cpu().contiguous()
        self.out_channels, self.in_channels, kh, kw = w.shape
        self.kernel_size = (kh, kw)
        self.stride = tuple(stride)
        self.padding = tuple(padding)
        self.dilation = tuple(dilation)
        self.k = self.in_channels * kh * kw  # true K: padded channel bits never count
        # Plain attributes, not buffers: model.half() or .to(dtype) must not round them.
        self.scale = scale.double().cpu()
        self.shift = shift.double().cpu()
        self.tap_sum = w.double().sum(dim=1)  # [Cout, kh, kw]
        self._borders: dict[tuple[int, int], Border] = {}
        self._tables: dict[tuple[int, int, bool], tuple[torch.Tensor, ...]] = {}

    def border(self, hw: tuple[int, int]) -> Border:
        """Padding classes for one input size, computed once per size."""
        if hw not in self._borders:
            self._borders[hw] = border(
                self.tap_sum, hw, self.stride, self.padding, self.dilation
            )
        return self._borders[hw]

    def epilogue(self, dot_mode: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift) of the output: folded ones, or (1, 0) for exact integer dots."""
        if dot_mode:
            return torch.ones_like(self.scale), torch.zeros_like(self.shift)
        return self.scale, self.shift

    def table(self, hw: tuple[int, int], dot_mode: bool) -> tuple[torch.Tensor, ...]:
        """The engine's (m, b, ...) for one input size, cached."""
        key = (*hw, dot_mode)
        if key not in self._tables:
            self._tables[key] = self.make_table(self.border(hw), *self.epilogue(dot_mode))
        return self._tables[key]

    def make_table(
        self, b: Border, scale: torch.Tensor, shift: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def run(self, x: torch.Tensor, dot_mode: bool) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.run(x, dot_mode=False)

    def integer_dot(self, x: torch.Tensor) -> torch.Tensor:
        """Exact sum(sign_pos(x) * w) over the kernel window (zero padding), as float32."""
        return self.run(x, dot_mode=True)

    @staticmethod
    def as_float(x: torch.Tensor) -> torch.Tensor:
        """The kernels read float32 on CPU; only the sign matters, so a cast is exact."""
        return x if x.dtype == torch.float32 else x.float()

    def extra_repr(self) -> str:  # noqa: D102
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}"
        )


class GroupedConv(nn.Module):
    """groups > 1: one runtime conv per group on its channel slice (correct, not fast)."""

    def __init__(self, convs: list[RuntimeConv]) -> None:
        super().__init__()
        self.convs = nn.ModuleList(convs)
        self.engine = convs[0].engine
        self.cin = convs[0].in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        parts = [c(x[:, i * self.cin : (i + 1) * self.cin]) for i, c in enumerate(self.convs)]
        return torch.cat(parts, dim=1)

    def integer_dot(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        parts = [
            c.integer_dot(x[:, i * self.cin : (i + 1) * self.cin])
            for i, c in enumerate(self.convs)
        ]
        return torch.cat(parts, dim=1)
