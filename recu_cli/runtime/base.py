"""What every runtime conv shares: geometry, the epilogue, cached zero-padding tables."""

from __future__ import annotations

import torch
from torch import nn

from recu_cli.errors import RecuError
from recu_cli.runtime.fold import Border, Epilogue, border
from recu_cli.runtime.geometry import ConvGeometry


class RuntimeConv(nn.Module):
    """A binary conv and its epilogue; subclasses supply the integer kernel.

    `forward(x)` equals bn(layer(x)) bit for bit (see fold.py); `integer_dot(x)` returns the
    exact integer dot products sum(sign_pos(x) * w) with zero padding, as float32, which
    must equal F.conv2d(sign_pos(x), weight_sign).
    """

    engine = "?"

    def __init__(self, weight_sign: torch.Tensor, epilogue: Epilogue, geometry: ConvGeometry):
        super().__init__()
        w = weight_sign.detach().float().cpu().contiguous()
        self.out_channels, self.in_channels, kh, kw = w.shape
        if geometry.kernel != (kh, kw):
            raise ValueError(f"geometry kernel {geometry.kernel} but weights {kh}x{kw}")
        self.geometry = geometry
        self.k = self.in_channels * kh * kw  # true K: padded channel bits never count
        # Plain attributes, not buffers: model.half() or .to(dtype) must not round them.
        self.epilogue = epilogue
        self.dot_epilogue = Epilogue.identity(self.out_channels)
        self.tap_sum = w.double().sum(dim=1)  # [Cout, kh, kw]
        # RSign threshold [1, Cin, 1, 1] float32 or None: the kernels read sign(x - beta),
        # which equals [x >= beta] exactly (IEEE subtraction is 0 only for x == beta)
        self.act_threshold: torch.Tensor | None = None
        self._tables: dict[tuple[int, int], tuple] = {}

    # nn.Conv2d's attribute names, read-only views of the one geometry (callers use them)
    kernel_size = property(lambda self: self.geometry.kernel)
    stride = property(lambda self: self.geometry.stride)
    padding = property(lambda self: self.geometry.padding)
    dilation = property(lambda self: self.geometry.dilation)

    def table(self, hw: tuple[int, int]) -> tuple:
        """The engine's zero-padding data for one input size, computed once per size."""
        if hw not in self._tables:
            b = border(self.tap_sum, hw, self.geometry)
            self._tables[hw] = self.make_table(b)
        return self._tables[hw]

    def make_table(self, b: Border) -> tuple:
        raise NotImplementedError

    # Caches are rebuilt on demand: dropping them keeps copy.deepcopy and torch.save working
    # (oneDNN's prepacked weights are opaque tensors that cannot be pickled).
    _CACHES = ("_tables",)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for name in self._CACHES:
            state[name] = type(state[name])()
        return state

    def run(self, x: torch.Tensor, dot: bool) -> torch.Tensor:
        """The engine's output: with self.epilogue, or the exact dots (dot_epilogue) if dot."""
        raise NotImplementedError

    def set_threshold(self, beta: torch.Tensor | None) -> None:
        """Take the deploy form's activation threshold (per input channel), if any."""
        if beta is not None:
            beta = beta.detach().float().cpu().reshape(1, -1, 1, 1)
            if beta.shape[1] != self.in_channels:
                raise RecuError(
                    f"activation threshold has {beta.shape[1]} values for "
                    f"{self.in_channels} input channels"
                )
        self.act_threshold = beta

    def shifted_input(self, x: torch.Tensor) -> torch.Tensor:
        """x - beta, exactly as the deploy form computes it (same float32 operation)."""
        x = self.as_float(x)
        return x if self.act_threshold is None else x - self.act_threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        self.check_input(x)
        return self.run(self.shifted_input(x), dot=False)

    def integer_dot(self, x: torch.Tensor) -> torch.Tensor:
        """Exact sum(sign_pos(x - beta) * w) over the kernel window (zero padding), as float32."""
        self.check_input(x)
        return self.run(self.shifted_input(x), dot=True)

    def check_input(self, x: torch.Tensor) -> None:
        """One clear line instead of a kernel assertion for the usual mistakes."""
        if x.device.type != "cpu":
            raise RecuError(
                f"the {self.engine} runtime runs on the CPU but got a {x.device.type} tensor; "
                "use --device cpu (or the torch engine)"
            )
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise RecuError(
                f"a {self.engine} conv expects [N, {self.in_channels}, H, W] input, got "
                f"{list(x.shape)}"
            )

    @staticmethod
    def as_float(x: torch.Tensor) -> torch.Tensor:
        """The kernels read float32 on CPU; only the sign matters, so a cast is exact."""
        return x if x.dtype == torch.float32 else x.float()

    def extra_repr(self) -> str:  # noqa: D102
        bn = ", bn folded" if self.epilogue.bn_a is not None else ""
        return f"{self.in_channels}, {self.out_channels}, {self.geometry}{bn}"


class GroupedConv(nn.Module):
    """groups > 1: one runtime conv per group on its channel slice (correct, not fast)."""

    def __init__(self, convs: list[RuntimeConv]) -> None:
        super().__init__()
        self.convs = nn.ModuleList(convs)
        self.engine = convs[0].engine
        self.cin = convs[0].in_channels

    def _split(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x[:, i * self.cin : (i + 1) * self.cin] for i in range(len(self.convs))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return torch.cat([c(p) for c, p in zip(self.convs, self._split(x), strict=True)], dim=1)

    def integer_dot(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return torch.cat(
            [c.integer_dot(p) for c, p in zip(self.convs, self._split(x), strict=True)], dim=1
        )


class WithBatchNorm(nn.Module):
    """conv then its BatchNorm, for the rare BN whose eval formula could not be fused exactly."""

    def __init__(self, conv: nn.Module, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv, self.bn = conv, bn.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.bn(self.conv(x))

    def integer_dot(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.conv.integer_dot(x)
