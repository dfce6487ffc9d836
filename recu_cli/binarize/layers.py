"""ReCUConv2d (training form) and BinaryConv2d (deploy form).

The weight path's formulas live in binarize/weights.py (docs/method.md section 1); the
layer's `quantize` returns them, and the statistics in `recu_cli.stats` reuse it instead of
re-deriving W1 and Q.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from recu_cli.binarize.functions import activation_sign, sign_pos, weight_sign_ste
from recu_cli.binarize.weights import (
    Quantized,
    ReCUWeightSign,
    centred,
    channel_mean_abs,
    recu_threshold,
    recu_weights,
)
from recu_cli.convert_config import ALPHA_MODES

__all__ = [
    "ALPHA_MODES",
    "BinaryConv2d",
    "Quantized",
    "ReCUConv2d",
    "centred",
    "recu_threshold",
    "shift_by_threshold",
]

AlphaMode = Literal["learned", "analytic"]


def shift_by_threshold(x: torch.Tensor, beta: torch.Tensor | None) -> torch.Tensor:
    """x - beta per input channel (the RSign threshold), or x when there is none.

    sign_pos of the result is +1 exactly where x >= beta: IEEE subtraction gives 0 only
    for x == beta, so training, deploy form and runtimes agree bit for bit.
    """
    return x if beta is None else x - beta.view(1, -1, 1, 1).to(x.dtype)


class ReCUConv2d(nn.Conv2d):
    """A 1-bit convolution trained with ReCU (rectified clamp unit).

    Takes nn.Conv2d's arguments plus:
      b_star: target Laplace scale of the standardized weights (paper default 2).
      tau: initial clamp quantile (a buffer, so it is saved with the model).
      standardize: per-filter centring + scaling (ablation switch; off = raw weights).
      clamp: apply ReCU's clamp at +-Q(tau) (ablation switch; off = plain sign).
      alpha_mode: "learned" per-channel scale (authors' code) or "analytic" E|ReCU(W)|
        per output channel (the paper's text).
      rescale_activations: training-time per-sample A / std(A) before sign.
      act_threshold: a learnable per-input-channel threshold beta before the sign,
        sign(x - beta) (ReActNet's RSign); off (beta = 0) reproduces the paper.

    `binarize_weights` (an attribute, set by the trainer's two-stage recipe) switches the
    weight path: False runs the conv with the real, centred latent weights W - mean(W)
    (stage 1: binary activations only), True with ReCU's binary weights (stage 2).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = False,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        b_star: float = 2.0,
        tau: float = 0.85,
        standardize: bool = True,
        clamp: bool = True,
        alpha_mode: AlphaMode = "learned",
        rescale_activations: bool = True,
        act_threshold: bool = False,
    ) -> None:
        if padding_mode != "zeros":
            raise ValueError("ReCUConv2d supports zero padding only (the bit runtime assumes it)")
        if alpha_mode not in ALPHA_MODES:
            raise ValueError(f"alpha_mode must be one of {ALPHA_MODES}, got {alpha_mode!r}")
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,
            device=device,
            dtype=dtype,
        )
        self.b_star = float(b_star)
        self.standardize = bool(standardize)
        self.clamp = bool(clamp)
        self.alpha_mode: AlphaMode = alpha_mode
        self.rescale_activations = bool(rescale_activations)
        self.binarize_weights = True
        self.register_buffer("tau", torch.tensor(float(tau), device=device))
        if act_threshold:
            self.act_threshold = nn.Parameter(torch.zeros(in_channels, device=device))
        else:
            self.register_parameter("act_threshold", None)
        alpha = torch.rand(out_channels, 1, 1, device=device)  # reference init: U[0, 1)
        if alpha_mode == "learned":
            self.alpha = nn.Parameter(alpha)
        else:
            self.register_buffer("alpha", alpha)

    @classmethod
    def from_conv(
        cls, conv: nn.Conv2d, alpha_init: Literal["pretrained", "random"] = "pretrained", **kw
    ) -> ReCUConv2d:
        """Binarize an existing conv, keeping its weights as the latent weights."""
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
            conv.padding_mode,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
            **kw,
        )
        with torch.no_grad():
            layer.weight.copy_(conv.weight)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
            if alpha_init == "pretrained":
                layer.alpha.copy_(channel_mean_abs(centred(conv.weight)))
        return layer

    def set_tau(self, tau: float) -> None:
        self.tau.fill_(float(tau))

    @torch.no_grad()
    def reset_alpha_from_latent(self) -> None:
        """alpha = mean |W - mean(W)| per output channel: the least-squares scale of sign(W0).

        Called when stage 2 starts, so that alpha * sign(W0) continues stage 1's W0.
        """
        self.alpha.copy_(channel_mean_abs(centred(self.weight)).to(self.alpha.dtype))

    def shifted_input(self, x: torch.Tensor) -> torch.Tensor:
        return shift_by_threshold(x, self.act_threshold)

    @property
    def gain(self) -> float:
        """sqrt(2) * b_star: the std of a Laplace(0, b_star)."""
        return math.sqrt(2.0) * self.b_star

    def quantize(self) -> Quantized:
        """W -> W1 (standardize) -> b_hat, Q(tau) -> W2 = clamp(W1, -Q, Q). No host sync."""
        return recu_weights(self.weight, self.tau, self.gain, self.standardize, self.clamp)[0]

    def binary_weight(self) -> torch.Tensor:
        """The +-1 weights used in the forward (straight-through gradient to the latents)."""
        return weight_sign_ste(self.quantize().w2)

    def dead_mask(self) -> torch.Tensor:
        """Latent weights that ReCU clamps (|W1| > Q): the paper's dead weights."""
        qz = self.quantize()
        return qz.w1.detach().abs() > qz.q

    def effective_alpha(self, w2: torch.Tensor | None = None) -> torch.Tensor:
        """Per-output-channel scale [Cout, 1, 1] applied to the binary conv (no side effect:
        the analytic mode's buffer is updated by `forward`, the one place that applies it)."""
        if self.alpha_mode == "learned":
            return self.alpha
        return channel_mean_abs(self.quantize().w2 if w2 is None else w2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        xb = activation_sign(
            self.shifted_input(x), rescale=self.training and self.rescale_activations
        )
        if not self.binarize_weights:  # stage 1: real centred weights, no alpha
            wb, alpha = centred(self.weight).to(xb.dtype), None
        elif self.alpha_mode == "learned":
            wb = ReCUWeightSign.apply(
                self.weight, self.tau, self.gain, self.standardize, self.clamp
            )
            alpha = self.alpha
        else:  # the analytic alpha needs W2 itself, with its own gradient
            w2 = self.quantize().w2
            wb, alpha = weight_sign_ste(w2), self.effective_alpha(w2)
            with torch.no_grad():  # the buffer shows the scale last applied (state_dict)
                self.alpha.copy_(alpha.detach())
        if alpha is not None and self.training:
            # alpha * conv(x, wb) == conv(x, alpha * wb): scaling the [Cout, Cin, k, k]
            # weights instead of the [N, Cout, H, W] output saves three passes over the
            # output per step (forward, and both gradients). Eval keeps the product after
            # the conv, the order the deploy form and the runtimes reproduce bit for bit.
            wb, alpha = wb * alpha.view(-1, 1, 1, 1).to(wb.dtype), None
        out = F.conv2d(xb, wb, None, self.stride, self.padding, self.dilation, self.groups)
        # alpha and bias in the conv's output dtype: under autocast an fp32 [C,1,1] factor
        # would promote the half output, and with it BN, the adds and the saved tensors
        if alpha is not None:
            out = out * alpha.to(out.dtype)
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1).to(out.dtype)
        return out

    def extra_repr(self) -> str:  # noqa: D102
        return (
            super().extra_repr()
            + f", b_star={self.b_star}, standardize={self.standardize}, clamp={self.clamp}, "
            f"alpha_mode={self.alpha_mode}, act_threshold={self.act_threshold is not None}"
        )


class BinaryConv2d(nn.Module):
    """Deploy form: ready +-1 weights and a per-channel scale; nothing left to train.

    Its eval output equals ReCUConv2d's eval output exactly (same sign convention, same
    conv, same scale), which is what makes a packed checkpoint faithful.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int] = (0, 0),
        dilation: tuple[int, int] = (1, 1),
        groups: int = 1,
        bias: bool = False,
        act_threshold: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = tuple(kernel_size)
        self.stride = tuple(stride)
        self.padding = tuple(padding)
        self.dilation = tuple(dilation)
        self.groups = groups
        kh, kw = self.kernel_size
        self.register_buffer("weight_sign", torch.ones(out_channels, in_channels // groups, kh, kw))
        self.register_buffer("alpha", torch.ones(out_channels, 1, 1))
        self.register_buffer("bias", torch.zeros(out_channels) if bias else None)
        self.register_buffer("act_threshold", torch.zeros(in_channels) if act_threshold else None)

    @classmethod
    def from_recu(cls, layer: ReCUConv2d) -> BinaryConv2d:
        pad = layer.padding
        if isinstance(pad, str):
            raise ValueError("string padding is not supported in the deploy form")
        out = cls(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            layer.stride,
            pad,
            layer.dilation,
            layer.groups,
            layer.bias is not None,
            layer.act_threshold is not None,
        )
        with torch.no_grad():
            out.weight_sign.copy_(layer.binary_weight())
            if layer.act_threshold is not None:
                out.act_threshold.copy_(layer.act_threshold)
            out.alpha.copy_(layer.effective_alpha())
            if layer.bias is not None:
                out.bias.copy_(layer.bias)
        return out.to(layer.weight.device)

    def binary_weight(self) -> torch.Tensor:
        return self.weight_sign

    def shifted_input(self, x: torch.Tensor) -> torch.Tensor:
        return shift_by_threshold(x, self.act_threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        out = F.conv2d(
            sign_pos(self.shifted_input(x)),
            self.weight_sign.to(x.dtype),
            None,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )
        out = out * self.alpha.to(out.dtype)
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1).to(out.dtype)
        return out

    def extra_repr(self) -> str:  # noqa: D102
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"groups={self.groups}"
        )
