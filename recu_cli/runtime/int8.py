"""int8 engine: the binary conv through PyTorch's own integer kernels (no C++ build needed).

Activations enter as bits B = [x >= 0] in {0, 1}, written by one comparison straight into a
uint8/int8 buffer (no float im2col), weights as +-1 int8. With x_s = 2 B - 1 on real taps
and 0 on padded ones (padded B is 0, so zero padding costs nothing in the GEMM):
    dot = 2 G - Wtot + P,  G = sum B w,  Wtot = sum of all weights,  P = padded-tap sum.
The dot is formed exactly (small integers in float32), then the epilogue of fold.py runs
as torch ops: dot * alpha (+ bias), then F.batch_norm itself for a folded BatchNorm, so the
output is bit-identical to bn(layer(x)) by construction.

Two backends, both integer-exact:
  onednn  oneDNN's quantized conv (u8 x s8, fp32 output, scale 2 and bias -Wtot fused), plus
          in-place adds of P on the few border rows/columns;
  int_mm  an int8 im2col (a strided view of a zero-padded NHWC bit buffer, one copy) times
          the weights through torch._int_mm.
onednn measured faster on an AVX-512 VNNI EPYC (docs/performance.md); int_mm is the
fallback where torch lacks the onednn ops.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from recu_cli.runtime.base import RuntimeConv
from recu_cli.runtime.fold import Border, Epilogue
from recu_cli.runtime.geometry import ConvGeometry

BACKENDS = ("onednn", "int_mm")
Fix = tuple[slice, slice, torch.Tensor]


@functools.cache
def onednn_available() -> bool:
    """Whether oneDNN's quantized conv runs here and is exact: one tiny trial conv, once."""
    try:
        w = torch.tensor([[[[1, -1], [-1, 1]]], [[[1, 1], [1, -1]]]], dtype=torch.int8)
        two, zp = torch.full((2,), 2.0), torch.zeros(2, dtype=torch.int64)
        packed = torch.ops.onednn.qconv_prepack(w, two, 1.0, 0, [1, 1], [1, 1], [1, 1], 1, None)
        bits = torch.tensor([[[[1, 0, 1], [0, 1, 1], [1, 1, 0]]]], dtype=torch.uint8)
        out = torch.ops.onednn.qconv_pointwise(
            bits.contiguous(memory_format=torch.channels_last), 1.0, 0, packed, two, zp, None,
            [1, 1], [1, 1], [1, 1], 1, 1.0, 0, torch.float32, "none", [], "",
        )  # fmt: skip
        ref = 2 * F.conv2d(bits.float(), w.float(), None, 1, 1)
        return bool(torch.equal(out, ref))
    except (AttributeError, RuntimeError, TypeError):
        return False


def border_fixes(b: Border, corr: torch.Tensor) -> list[Fix]:
    """In-place adds that put corr[cls(y, x)] on border pixels only (interior classes are 0)."""
    ymap, xmap = b.ymap.long(), b.xmap.long()
    y_edge, x_edge = b.y_edge[ymap], b.x_edge[xmap]
    fixes: list[Fix] = []
    for y in torch.nonzero(y_edge).flatten().tolist():
        t = corr[ymap[y]][xmap]  # [Wo, Cout]
        if bool(t.any()):
            fixes.append((slice(y, y + 1), slice(None), t.t().unsqueeze(1).float()))
    inner = torch.nonzero(~y_edge).flatten().tolist()
    if inner:
        r0, r1 = inner[0], inner[-1] + 1  # interior rows are one contiguous run
        for x in torch.nonzero(x_edge).flatten().tolist():
            t = corr[ymap[r0], xmap[x]]  # [Cout]
            if bool(t.any()):
                fixes.append((slice(r0, r1), slice(x, x + 1), t.view(-1, 1, 1).float()))
    return fixes


def _is_nhwc(x: torch.Tensor) -> bool:
    """Channels-last input (the output keeps the input's memory format, as F.conv2d does)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


class Int8Conv2d(RuntimeConv):
    """Binary conv as a {0,1} x {+-1} int8 conv/GEMM with the folded epilogue."""

    engine = "int8"

    def __init__(
        self, weight_sign: torch.Tensor, epilogue: Epilogue, geometry: ConvGeometry,
        backend: str = "auto",
    ) -> None:  # fmt: skip
        super().__init__(weight_sign, epilogue, geometry)
        if backend == "auto":
            backend = "onednn" if onednn_available() else "int_mm"
        if backend not in BACKENDS:
            raise ValueError(f"int8 backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        w = weight_sign.detach().float().cpu()
        self.w_total = w.double().sum(dim=(1, 2, 3))
        self.weight_i8 = torch.where(w >= 0, 1, -1).to(torch.int8).contiguous()
        # int_mm: [K, Cout], K ordered (ky, kx, c) to match the im2col view; built once here.
        self.weight_kn = (
            self.weight_i8.permute(2, 3, 1, 0).reshape(-1, w.shape[0]).contiguous()
            if backend == "int_mm"
            else None
        )
        self._prepacked: list[torch.Tensor] = []

    _CACHES = ("_tables", "_prepacked")

    # -- zero-padding tables -----------------------------------------------------------------
    def make_table(self, b: Border) -> tuple:
        if self.backend == "int_mm":
            kmap = (b.pad_sum - self.w_total).round().int()  # [nyc, nxc, Cout]
            return (kmap[b.ymap.long()][:, b.xmap.long()].contiguous(),)  # [Ho, Wo, Cout]
        return (border_fixes(b, b.pad_sum),)

    def _packed(self) -> tuple[torch.Tensor, ...]:
        """oneDNN-prepacked weights with scale 2 and bias -Wtot: the conv yields 2 G - Wtot."""
        if not self._prepacked:
            cout = self.out_channels
            two = torch.full((cout,), 2.0)
            packed = torch.ops.onednn.qconv_prepack(
                self.weight_i8, two, 1.0, 0, *self.geometry.onednn(), 1, None
            )
            zp = torch.zeros(cout, dtype=torch.int64)
            self._prepacked = [packed, two, zp, (-self.w_total).float()]
        return tuple(self._prepacked)

    # -- compute -----------------------------------------------------------------------------
    def run(self, x: torch.Tensor, dot: bool) -> torch.Tensor:  # noqa: D102
        epilogue = self.dot_epilogue if dot else self.epilogue
        dots = self._dot_int_mm(x) if self.backend == "int_mm" else self._dot_onednn(x)
        fmt = torch.channels_last if _is_nhwc(x) else torch.contiguous_format
        out = torch.empty(dots.shape, memory_format=fmt)  # this pass also sets the layout
        torch.mul(dots, epilogue.alpha.view(1, -1, 1, 1), out=out)
        if epilogue.bias is not None:
            out.add_(epilogue.bias.view(1, -1, 1, 1))
        if epilogue.bn_params is not None:
            mean, var, gamma, beta, eps = epilogue.bn_params
            out = F.batch_norm(out, mean, var, gamma, beta, False, 0.0, eps)
        return out

    def _dot_onednn(self, x: torch.Tensor) -> torch.Tensor:
        (fixes,) = self.table((x.shape[-2], x.shape[-1]))
        bits = torch.empty(x.shape, dtype=torch.bool, memory_format=torch.channels_last)
        torch.ge(x, 0, out=bits)  # oneDNN wants NHWC u8 and returns NHWC
        packed, two, zp, bias = self._packed()
        out = torch.ops.onednn.qconv_pointwise(
            bits.view(torch.uint8), 1.0, 0, packed, two, zp, bias, *self.geometry.onednn(), 1,
            1.0, 0, torch.float32, "none", [], "",
        )  # fmt: skip
        for ys, xs, p in fixes:
            out[:, :, ys, xs] += p
        return out

    def _dot_int_mm(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        (kmap,) = self.table((h, w))
        g = self.geometry
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = g.kernel, g.stride, g.padding, g.dilation
        ho, wo = kmap.shape[:2]
        hp, wp = h + 2 * ph, w + 2 * pw
        bits = torch.zeros(n, hp, wp, c, dtype=torch.bool)
        torch.ge(x.permute(0, 2, 3, 1), 0, out=bits[:, ph : ph + h, pw : pw + w])
        cols = bits.view(torch.int8).as_strided(
            (n, ho, wo, kh, kw, c),
            (hp * wp * c, sh * wp * c, sw * c, dh * wp * c, dw * c, 1),
        )
        g = torch._int_mm(cols.reshape(n * ho * wo, kh * kw * c), self.weight_kn)
        return torch.add(kmap, g.view(n, ho, wo, -1), alpha=2).float().permute(0, 3, 1, 2)

    def extra_repr(self) -> str:  # noqa: D102
        return super().extra_repr() + f", backend={self.backend}"
