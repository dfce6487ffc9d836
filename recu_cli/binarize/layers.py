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

    The weight path is chosen by `weight_mix` (`set_weight_mix`, or the bool view
    `binarize_weights` that the trainer's two-stage recipe sets): 0 runs the conv with the
    real, centred latent weights W0 = W - mean(W) (stage 1: binary activations only), 1
    with ReCU's binary weights alpha * sign(W2) (stage 2), and a value m in between with
    torch.lerp(W0, alpha * sign(W2), m) = (1 - m) W0 + m alpha sign(W2), so both paths
    receive gradient ((1 - m) and m times the output's), e.g. for a progressive switch.
    `weight_mix` is a non-persistent buffer (state_dict and packed files do not hold it): a
    compiled or CUDA-graph-captured forward reads it as a tensor, so the stage switch
    changes no graph. Eager forwards at exactly 0 or 1 take their own branch (the Python
    mirror of the same value), which computes only the path in use.
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
        self.register_buffer("tau", torch.tensor(float(tau), device=device))
        self.register_buffer("weight_mix", torch.ones((), device=device), persistent=False)
        self._weight_mix = 1.0  # the buffer's value, for eager branching without a host read
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

    def set_weight_mix(self, mix: float) -> None:
        """0 = stage 1 (real centred weights W0), 1 = ReCU's binary weights, in between the
        linear blend of both (class docstring). Filled in place: a captured graph sees it."""
        mix = float(mix)
        if not 0.0 <= mix <= 1.0:
            raise ValueError(f"weight_mix must be in [0, 1], got {mix}")
        self.weight_mix.fill_(mix)
        self._weight_mix = mix

    @property
    def binarize_weights(self) -> bool:
        """True when the forward uses ReCU's binary weights alone (weight_mix 1)."""
        return self._weight_mix == 1.0

    @binarize_weights.setter
    def binarize_weights(self, on: bool) -> None:
        self.set_weight_mix(1.0 if on else 0.0)

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

    def binary_weight_and_alpha(self) -> tuple[torch.Tensor, torch.Tensor]:
        """sign(W2) (with the weight path's gradient) and alpha, as stage 2 applies them."""
        if self.alpha_mode == "learned":
            wb = ReCUWeightSign.apply(
                self.weight, self.tau, self.gain, self.standardize, self.clamp
            )
            return wb, self.alpha
        w2 = self.quantize().w2  # the analytic alpha needs W2 itself, with its own gradient
        return weight_sign_ste(w2), self.effective_alpha(w2)

    def mixed_weight(self) -> torch.Tensor:
        """(1 - m) W0 + m alpha sign(W2), m = weight_mix: the weights of any stage, one graph.

        Exact at 0 (W0) and 1 (alpha * sign(W2)); alpha is folded into the weights
        (conv(x, alpha * wb) == alpha * conv(x, wb)). The analytic alpha's buffer keeps the
        scale last applied: unchanged while the mix is 0, as in the stage-1 branch."""
        wb, alpha = self.binary_weight_and_alpha()
        mix = self.weight_mix
        if self.alpha_mode == "analytic":
            with torch.no_grad():
                self.alpha.copy_(torch.where(mix > 0, alpha.detach(), self.alpha))
        w0 = centred(self.weight)
        binary = wb * alpha.view(-1, 1, 1, 1).to(wb.dtype)
        mix = mix.to(w0.dtype)
        # (1 - m) W0 + m alpha sign(W2), written out: with torch.lerp here the compiled CUDA
        # step left the latent weights unchanged in stage 2 (H200, torch 2.11; CPU compiles
        # were right), lerp's backward the suspect; this form is not yet verified on a GPU
        # (docs/performance.md). Exact at 0 and 1 (x * 0 = +-0 and 0 + y = y).
        return w0 * (1.0 - mix) + binary * mix

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        xb = activation_sign(
            self.shifted_input(x), rescale=self.training and self.rescale_activations
        )
        mix = self._weight_mix
        alpha: torch.Tensor | None = None
        if torch.compiler.is_compiling() or 0.0 < mix < 1.0:
            wb = self.mixed_weight()  # one graph for every stage (no recompile at a switch)
        elif mix == 0.0:  # stage 1: real centred weights, no alpha
            wb = centred(self.weight).to(xb.dtype)
        else:
            wb, alpha = self.binary_weight_and_alpha()
            if self.alpha_mode == "analytic":
                with torch.no_grad():  # the buffer shows the scale last applied (state_dict)
                    self.alpha.copy_(alpha.detach())
            if self.training:
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
