"""ReCU's weight path, each formula once (docs/method.md section 1).

W0 = W - mean(W)                         centred latent weights (what sign() binarizes)
W1 = k (W - mean) / sqrt(var + eps)      standardized, k = sqrt(2) b_star
b_hat = mean |W1|                        Laplace scale of the layer (detached)
Q(tau) = -b_hat ln(2 - 2 tau)            clamp threshold, the tau-quantile
W2 = clamp(W1, -Q, Q)                    ReCU(W1); the layer binarizes sign(W2)
gap = 1 - mean|W0|^2 / mean(W0^2)        what binarizing W0 loses, per channel (sign_gap)

`recu_weights` computes them; `ReCUConv2d.quantize` returns it as is and the fused autograd
function below runs the same function forward, so the readable and the fast path cannot
drift apart.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from recu_cli.binarize.functions import sign_pos

WEIGHT_EPS = 1e-5
SIGN_GAP_EPS = 1e-20  # keeps an all-zero channel at gap 1 instead of 0 / 0


class Quantized(NamedTuple):
    """Intermediate tensors of the weight path, named as in the paper."""

    w1: torch.Tensor  # standardized latent weights
    b_hat: torch.Tensor  # Laplace scale of the layer (0-dim, detached)
    q: torch.Tensor  # clamp threshold Q(tau) (0-dim, +inf at tau = 1)
    w2: torch.Tensor  # ReCU(W1) = clamp(W1, -Q, Q)


def centred(w: torch.Tensor) -> torch.Tensor:
    """W0 = W - mean(W) per output channel: what sign() binarizes, and stage 1's weights."""
    return w - w.mean(dim=(1, 2, 3), keepdim=True)


def channel_mean_abs(w: torch.Tensor) -> torch.Tensor:
    """mean |w| per output channel as [Cout, 1, 1]: the least-squares scale of sign(w).

    Of W0 it is the pretrained alpha; of W2 the paper's analytic alpha E|ReCU(W)|."""
    return w.abs().mean(dim=(1, 2, 3)).view(-1, 1, 1)


def sign_gap(w0: torch.Tensor) -> torch.Tensor:
    """||W0 - a sign(W0)||^2 / ||W0||^2 with a = mean |W0|, per output channel, averaged.

    The share of a channel's weight energy that its best binary approximation loses
    (a = mean |W0| is the least-squares scale): 0 when every |w| is equal, 1 - 2/pi for a
    Gaussian channel, 1/2 for a Laplace one. Scale-free, so one penalty weight means the
    same in every layer; the stage-1 penalty of training/switch.py lowers it so that the
    stage switch, which replaces W0 by alpha sign(W0), changes the network less."""
    mean_abs = w0.abs().mean(dim=(1, 2, 3))
    mean_sq = w0.square().mean(dim=(1, 2, 3))
    return (1.0 - mean_abs.square() / (mean_sq + SIGN_GAP_EPS)).mean()


def recu_threshold(b_hat: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Q(tau) = -b_hat * ln(2 - 2 tau): the tau-quantile of Laplace(0, b_hat); +inf at tau = 1."""
    return -b_hat * torch.log(2.0 - 2.0 * tau)


def standardize_weight(
    w: torch.Tensor, gain: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W1 = gain * (W - mean) / sqrt(var + eps) per output channel (unbiased var).

    Returns W1, the mean and 1 / sqrt(var + eps) (the last two for hand-written backward).
    """
    var, mean = torch.var_mean(w, dim=(1, 2, 3), keepdim=True, correction=1)
    inv_std = torch.rsqrt(var + WEIGHT_EPS)
    return (w - mean) * (gain * inv_std), mean, inv_std


def recu_weights(
    w: torch.Tensor, tau: torch.Tensor, gain: float, standardize: bool, clamp: bool
) -> tuple[Quantized, torch.Tensor | None]:
    """W -> W1 -> b_hat, Q(tau) -> W2, and 1 / std of W (None without standardization),
    which the fused backward needs. No host sync."""
    if standardize:
        w1, _, inv_std = standardize_weight(w, gain)
    else:
        w1, inv_std = w, None
    b_hat = w1.detach().abs().mean()
    q = recu_threshold(b_hat, tau.to(w1.dtype))
    w2 = torch.clamp(w1, -q, q) if clamp else w1
    return Quantized(w1, b_hat, q, w2), inv_std


class ReCUWeightSign(torch.autograd.Function):
    """sign(W2) with the exact gradient of the weight path, in a few passes.

    Forward: `recu_weights`. Backward: identity STE through sign, zero outside [-Q, Q]
    (the clamp), then the derivative of the standardization (mean and variance not
    detached), written out for W1 = k (W - m) inv_std:
        dW = inv_std * (k (g - mean(g)) - W1 * sum(g * W1) / (k (n - 1)))
    Q itself is detached (b_hat is), as in the reference code.
    """

    @staticmethod
    def forward(
        ctx, w: torch.Tensor, tau: torch.Tensor, gain: float, standardize: bool, clamp: bool
    ) -> torch.Tensor:  # noqa: D102
        qz, inv_std = recu_weights(w, tau, gain, standardize, clamp)
        keep = qz.w1.abs() <= qz.q if clamp else None
        ctx.gain, ctx.standardize = gain, standardize
        ctx.save_for_backward(qz.w1, inv_std, keep)
        return sign_pos(qz.w2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        w1, inv_std, keep = ctx.saved_tensors
        g = grad if keep is None else grad * keep
        if ctx.standardize:
            k = ctx.gain
            n = w1[0].numel()
            dot = (g * w1).sum(dim=(1, 2, 3), keepdim=True)
            g = (g - g.mean(dim=(1, 2, 3), keepdim=True)).mul_(k)
            g = g.sub_(w1 * (dot / (k * (n - 1)))).mul_(inv_std)
        return g, None, None, None, None
