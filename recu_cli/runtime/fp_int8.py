"""`--fp-layers int8`: the full-precision layers of a BNN (stem, 1x1 shortcuts, classifier) in int8.

Once the binary convs are fast, the float stem conv and the classifier are most of what is
left (docs/performance.md). oneDNN runs them as u8 x s8 with VNNI, several times faster
than fp32, which is what an int8 peer such as OpenVINO does for every layer. The price is
accuracy: unlike the rest of the runtime this is not exact. Weights are quantized per output
channel (symmetric, 127 levels), inputs per tensor (asymmetric u8) with the range observed on
calibration images; outputs stay float32, so BatchNorm, the shortcuts and the binary convs
that follow are unchanged. Off by default; its accuracy change is measured in
docs/performance.md.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import torch
from torch import nn

from recu_cli.binarize.layers import BinaryConv2d
from recu_cli.errors import RecuError
from recu_cli.runtime import ext
from recu_cli.runtime.geometry import ConvGeometry


def _weight_scales(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 weights and their float scales."""
    flat = w.detach().float().reshape(w.shape[0], -1)
    scale = (flat.abs().amax(dim=1) / 127).clamp_min(1e-12)
    q = torch.round(w.detach().float() / scale.view(-1, *([1] * (w.dim() - 1))))
    return q.clamp(-127, 127).to(torch.int8), scale


class InputRange:
    """Running min / max of a layer's input over the calibration batches."""

    def __init__(self) -> None:
        self.lo, self.hi = float("inf"), float("-inf")

    def update(self, x: torch.Tensor) -> None:
        self.lo = min(self.lo, float(x.min()))
        self.hi = max(self.hi, float(x.max()))

    def quant_params(self) -> tuple[float, int]:
        """(scale, zero point) of an asymmetric u8 grid covering [lo, hi] and 0."""
        if self.lo > self.hi:
            raise RecuError("int8 calibration saw no input for a layer; give calibration images")
        lo, hi = min(self.lo, 0.0), max(self.hi, 0.0)
        scale = max(hi - lo, 1e-8) / 255
        return scale, int(min(255, max(0, round(-lo / scale))))


@functools.cache
def _one_pass_quantizer() -> Callable | None:
    try:
        return ext.ops().quantize_u8
    except RecuError:
        return None


def _quantize_input(x: torch.Tensor, scale: float, zp: int) -> torch.Tensor:
    """Plain uint8, as oneDNN takes it: in one pass with the C++ kernels where they build
    (ATen's quantize_per_tensor + int_repr, or the decomposed op, take 5-10x longer)."""
    quantize = _one_pass_quantizer()
    if quantize is not None:
        return quantize(x.float(), scale, zp, -1)
    return torch.ops.quantized_decomposed.quantize_per_tensor(
        x.float(), scale, zp, 0, 255, torch.uint8
    )


class _Int8Layer(nn.Module):
    """What the int8 conv and linear share: the quantized weights, the input grid, and
    oneDNN's prepacked weights, built on first use (they cannot be pickled or copied)."""

    def __init__(self, layer: nn.Conv2d | nn.Linear, rng: InputRange) -> None:
        super().__init__()
        self.outputs = layer.weight.shape[0]
        self.x_scale, self.x_zp = rng.quant_params()
        self.w_q, self.w_scale = _weight_scales(layer.weight)
        self.w_zp = torch.zeros(self.outputs, dtype=torch.int64)
        self.bias = None if layer.bias is None else layer.bias.detach().float().clone()
        self._packed: torch.Tensor | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_packed": None}

    def extra_repr(self) -> str:  # noqa: D102
        return f"{self.outputs}, int8 (oneDNN), x_scale={self.x_scale:.4g}, x_zp={self.x_zp}"


class Int8Conv2d(_Int8Layer):
    """nn.Conv2d as oneDNN u8 x s8 with float32 output (groups 1, zero padding)."""

    def __init__(self, conv: nn.Conv2d, rng: InputRange) -> None:
        super().__init__(conv, rng)
        self.geometry = ConvGeometry.of(conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if self._packed is None:
            self._packed = torch.ops.onednn.qconv_prepack(
                self.w_q, self.w_scale, self.x_scale, self.x_zp, *self.geometry.onednn(), 1, None
            )
        q = _quantize_input(x, self.x_scale, self.x_zp)
        q = q.contiguous(memory_format=torch.channels_last)
        return torch.ops.onednn.qconv_pointwise(
            q, self.x_scale, self.x_zp, self._packed, self.w_scale, self.w_zp, self.bias,
            *self.geometry.onednn(), 1, 1.0, 0, torch.float32, "none", [], "",
        )  # fmt: skip


class Int8Linear(_Int8Layer):
    """nn.Linear as oneDNN u8 x s8 with float32 output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if self._packed is None:
            self._packed = torch.ops.onednn.qlinear_prepack(self.w_q, None)
        lead = x.shape[:-1]
        q = _quantize_input(x.reshape(-1, x.shape[-1]), self.x_scale, self.x_zp)
        out = torch.ops.onednn.qlinear_pointwise(
            q, self.x_scale, self.x_zp, self._packed, self.w_scale, self.w_zp, self.bias,
            1.0, 0, torch.float32, "none", [], "",
        )  # fmt: skip
        return out.reshape(*lead, self.outputs)


def _eligible(m: nn.Module) -> bool:
    if isinstance(m, BinaryConv2d):
        return False
    if type(m) is nn.Conv2d:
        return m.groups == 1 and m.padding_mode == "zeros" and isinstance(m.padding, tuple)
    return type(m) is nn.Linear


def int8_available() -> tuple[bool, str]:
    """oneDNN's int8 conv and linear ops, and the quantize op, in this torch build."""
    try:
        import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantize_per_tensor)

        torch.ops.onednn.qconv_pointwise  # noqa: B018
        torch.ops.onednn.qlinear_pointwise  # noqa: B018
    except (AttributeError, ImportError, RuntimeError) as e:
        return False, f"this torch build lacks oneDNN's int8 ops ({e}); use --fp-layers exact"
    return True, "oneDNN u8 x s8"


def quantize_float_layers(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Swap every full-precision conv / linear of `model` (in place) for its int8 form.

    `batches` are calibration inputs of the whole model (real images, eval transforms); the
    input range of each layer is what the model, as it is now, feeds it on them.
    """
    ok, why = int8_available()
    if not ok:
        raise RecuError(why, exit_code=1)
    sites = [(n, m) for n, m in model.named_modules() if _eligible(m)]
    ranges = {n: InputRange() for n, _ in sites}
    hooks = [
        m.register_forward_pre_hook(lambda _m, args, r=ranges[n]: r.update(args[0]))
        for n, m in sites
    ]
    try:
        with torch.no_grad():
            seen = 0
            for x in batches:
                model(x)
                seen += 1
            if not seen:
                raise RecuError("int8 calibration needs at least one batch of images")
    finally:
        for h in hooks:
            h.remove()
    for name, m in sites:
        parent, _, key = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        kind = Int8Conv2d if isinstance(m, nn.Conv2d) else Int8Linear
        owner._modules[key] = kind(m, ranges[name])
    return len(sites)
