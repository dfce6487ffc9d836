"""Sign functions of ReCU with their surrogate gradients.

One convention for sign(0) everywhere: 0 maps to +1 (the paper's Eq. 2), because one bit
cannot store 0 and a packed checkpoint must reproduce the trained model exactly.
"""

from __future__ import annotations

import contextlib

import torch

ACT_EPS = 1e-5


def sign_pos(x: torch.Tensor) -> torch.Tensor:
    """sign with sign(0) = sign(-0) = +1, in x's dtype.

    Written as sign(sign(x) + 0.5): sign(x) is -1, +-0 or +1, and adding 0.5 moves both
    zeros to +0.5 and nothing across zero. One fresh tensor, written in place after that:
    on CPU each fresh activation-sized tensor costs page faults, so this runs 2-10x faster
    than torch.ones_like(x).copysign_(x + 0.0) (two fresh tensors) and far faster than
    torch.where(x >= 0, 1, -1) (bool kernels are slow there); it equals both for every
    non-NaN x (NaN stays NaN).
    """
    return torch.sign(x).add_(0.5).sign_()


class _WeightSignSTE(torch.autograd.Function):
    """Forward sign_pos, backward identity (no |w| <= 1 cut-off, as in the ReCU code)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return sign_pos(w)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return grad


def weight_sign_ste(w: torch.Tensor) -> torch.Tensor:
    """Binarize weights; gradient passes straight through."""
    return _WeightSignSTE.apply(w)


def approx_sign_grad(a0: torch.Tensor) -> torch.Tensor:
    """Bi-Real ApproxSign derivative: max(0, 2 - |2 a0|)."""
    return (2.0 - 2.0 * a0.abs()).clamp_(min=0.0)


class _ApproxSign(torch.autograd.Function):
    """sign_pos forward, ApproxSign backward."""

    @staticmethod
    def forward(ctx, a: torch.Tensor) -> torch.Tensor:  # noqa: D102
        ctx.save_for_backward(a)
        return sign_pos(a)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        (a,) = ctx.saved_tensors
        return grad * approx_sign_grad(a)


class _RescaledApproxSign(torch.autograd.Function):
    """sign(A / s) with s = sqrt(var(A over C,H,W) + eps) per sample, fused.

    Since s > 0, sign(A / s) == sign(A): the forward needs only the reduction for s. The
    backward is the exact derivative of ApproxSign(A / s), s included (not detached):
        g0 = grad * max(0, 2 - 2|A| / s)
        dA = g0 / s - (A - mean) * sum(g0 * A) / ((N - 1) s^3)
    computed in place in 8 memory passes (autograd's graph of the same formula takes 12
    passes and 9 temporaries of the activation's size).
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor) -> torch.Tensor:  # noqa: D102
        dims = tuple(range(1, a.dim()))
        n = a[0].numel()
        acc = _accumulation_dtype(a)
        # unbiased variance from the first two moments: two fast reductions instead of
        # torch.var_mean's Welford pass, which is ~15x slower on CPU for this layout (the
        # squares via vector_norm, which reads a once and writes no squared copy);
        # accumulated in fp32 for half inputs (a sum of ~200k squares overflows fp16)
        with _without_autocast(a.device.type):  # no autocast copies to fp32
            mean = a.mean(dim=dims, keepdim=True, dtype=acc)
            sq = torch.linalg.vector_norm(a, dim=dims, keepdim=True, dtype=acc).square()
            var = (sq - n * mean.square()) / (n - 1)
            inv_std = torch.rsqrt(var.clamp_(min=0.0) + ACT_EPS)
        ctx.save_for_backward(a, mean, inv_std)
        return sign_pos(a)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        a, mean, inv_std = ctx.saved_tensors
        n = a[0].numel()
        g0 = a.abs()
        g0.mul_(-2.0 * inv_std).add_(2.0).clamp_(min=0.0).mul_(grad)
        coef = _per_sample_dot(g0, a).view_as(mean) * inv_std.pow(3) / (n - 1)
        g0.mul_(inv_std).addcmul_(a, coef, value=-1.0).add_(mean * coef)
        return g0


def _without_autocast(device_type: str) -> contextlib.AbstractContextManager:
    if torch.compiler.is_compiling():  # the reductions name their dtype; casts get fused
        return contextlib.nullcontext()
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _accumulation_dtype(a: torch.Tensor) -> torch.dtype:
    """fp32 for fp16/bf16 tensors (their sums over a sample exceed 65504 once the loss is
    scaled), the tensor's own dtype otherwise (fp32 and fp64 results are unchanged)."""
    return torch.promote_types(a.dtype, torch.float32)


def _per_sample_dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sum(x * y) over all dims but the first, as a [N] tensor in the accumulation dtype.

    Reduces in memory order: a channels-last tensor is read as the [N, H*W*C] view it
    already is (flatten(1) would copy it to NCHW first). x and y share y's layout.
    """
    acc = _accumulation_dtype(y)
    if y.dtype != acc or torch.compiler.is_compiling():
        # half: products summed in fp32, never rounded to half; compiled: the same sum,
        # which the compiler fuses into one kernel (the stride-ordered view below exists for
        # eager CPU speed, and a sort over strides cannot be traced)
        return (x * y).sum(dim=tuple(range(1, y.dim())), dtype=acc)
    order = sorted(range(1, y.dim()), key=lambda d: -y.stride(d))
    rows = [t.permute(0, *order).reshape(t.shape[0], -1) for t in (x, y)]
    return torch.linalg.vecdot(rows[0], rows[1])


def activation_sign(a: torch.Tensor, rescale: bool) -> torch.Tensor:
    """Binarize activations; rescale=True applies the training-time per-sample rescale."""
    if not torch.is_grad_enabled() or not a.requires_grad:
        return sign_pos(a)
    if rescale:
        return _RescaledApproxSign.apply(a)
    return _ApproxSign.apply(a)


def rescale_activation(a: torch.Tensor) -> torch.Tensor:
    """Reference (unfused) training-time rescale A / sqrt(var + eps); used by tests."""
    dims = tuple(range(1, a.dim()))
    return a / torch.sqrt(a.var(dim=dims, keepdim=True, unbiased=True) + ACT_EPS)
