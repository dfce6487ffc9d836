"""Does the compiled step compute the eager step's gradients? Asked once per stage.

The compiled step is the eager maths traced by torch.compile, and a compiler fault there
trains silently wrong: on the first H200 run the compiled step left the latent weights
where they were for all of stage 2 (39 % val instead of 68 %) while every CPU test passed.
So a compiled run takes the first full batch of each stage (and of a resumed run), computes
the gradients of that batch with both the eager and the compiled forward, before either
touches the weights, and compares them: when they disagree, the run goes on eagerly and
train.log says why. Two forward-backward passes per stage; nothing else changes (the
BatchNorm statistics both forwards update are put back, `.grad` is not touched).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

# What is compared is each latent binary weight's gradient norm, compiled over eager. Not
# the direction: sign() turns small rounding differences into flipped activations, and a
# BNN's gradient direction follows them. bench/step_check_noise.py (resnet20, batch 128,
# CPU): under bf16 autocast the cosine of all gradients is 0.59-0.84 between compiled and
# eager, as between eager with and without autocast (0.62-0.86) or eager and its batch
# moved by 1e-3 (0.64-0.84), while each latent weight's gradient norm stays within
# 0.87-1.23x in all of them (fp32: compiled 0.99-1.04x). The H200's frozen stage 2: 0x.
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
MAX_NORM_RATIO = 2.0  # each latent weight's |compiled grad| / |eager grad|, either way round


@dataclass(frozen=True)
class Agreement:
    """The norm ratios of the latent weights' gradients (compiled / eager) farthest from 1
    either way, where they were, and the whole gradient's cosine (for the log only)."""

    lowest: tuple[float, str]
    highest: tuple[float, str]
    cosine: float

    @property
    def ok(self) -> bool:
        return self.lowest[0] >= 1.0 / MAX_NORM_RATIO and self.highest[0] <= MAX_NORM_RATIO

    def describe(self) -> str:
        (lo, lo_at), (hi, hi_at) = self.lowest, self.highest
        return (
            f"latent-weight gradient norms {lo:.3f}x ({lo_at}) to {hi:.3f}x ({hi_at}) of "
            f"eager's, cosine of all gradients {self.cosine:.3f}"
        )


def cosine_and_ratio(eager: torch.Tensor, compiled: torch.Tensor) -> tuple[float, float]:
    """Cosine of two gradients and |compiled| / |eager|, in float64. Two zero gradients
    agree (cosine 1, ratio 1); one zero against a non-zero one does not."""
    a, b = eager.detach().double().flatten(), compiled.detach().double().flatten()
    na, nb = a.norm().item(), b.norm().item()
    if na == 0.0 and nb == 0.0:
        return 1.0, 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0, (math.inf if na == 0.0 else 0.0)
    return (a @ b).item() / (na * nb), nb / na


def compare(
    names: list[str], eager: list[torch.Tensor], compiled: list[torch.Tensor], latent: set[str]
) -> Agreement:
    """Two gradient lists (in the order of `names`); `latent` names the latent binary
    weights, each compared alone (a fault in a few layers would hide in the whole). A model
    without any: the whole gradient's ratio."""
    cosine, whole = cosine_and_ratio(
        torch.cat([g.flatten() for g in eager]), torch.cat([g.flatten() for g in compiled])
    )
    ratios = [
        (cosine_and_ratio(e, c)[1], name)
        for name, e, c in zip(names, eager, compiled, strict=True)
        if name in latent
    ] or [(whole, "all parameters")]
    return Agreement(min(ratios), max(ratios), cosine)


def gradients(loss_fn: Loss, params: list[nn.Parameter], images, targets) -> list[torch.Tensor]:
    """d loss / d params for one batch, without touching `.grad` (a captured step owns it);
    a parameter the loss does not reach gets zeros."""
    loss = loss_fn(images, targets)
    grads = torch.autograd.grad(loss.float(), params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


def saved_buffers(model: nn.Module) -> list[torch.Tensor]:
    """Copies of BatchNorm's running statistics (and any buffer a forward updates)."""
    return [b.detach().clone() for b in model.buffers()]


def restore_buffers(model: nn.Module, saved: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for b, value in zip(model.buffers(), saved, strict=True):
            b.copy_(value)


@contextmanager
def buffers_kept(model: nn.Module) -> Iterator[None]:
    """The model's buffers as they were before the block, whatever it ran."""
    saved = saved_buffers(model)
    try:
        yield
    finally:
        restore_buffers(model, saved)


def check_compiled_step(
    model: nn.Module,
    wrapped: nn.Module,
    latent: set[str],
    eager_loss: Loss,
    compiled_loss: Loss,
    images: torch.Tensor,
    targets: torch.Tensor,
) -> Agreement:
    """The gradients of one batch, eager against compiled. `wrapped` is the module the loss
    calls (DistributedDataParallel under torchrun: its gradient reduction stays out of
    this, no_sync). Raises what compiling raises: the caller falls back to eager."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names, params = [n for n, _ in named], [p for _, p in named]
    no_sync = getattr(wrapped, "no_sync", None)
    with no_sync() if no_sync is not None else nullcontext():
        with buffers_kept(model):
            eager = gradients(eager_loss, params, images, targets)
        with buffers_kept(model):
            compiled = gradients(compiled_loss, params, images, targets)
    return compare(names, eager, compiled, latent)
