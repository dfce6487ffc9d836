"""Data-driven starting points for a converted model, and what its signs pass through.

Conversion keeps every pretrained weight, but the sign() in front of each binary conv sees
activations whose channels are often almost all of one sign (a pretrained ReLU network's
features are shifted); such a channel carries no information through one bit. Three tools:

- `calibrate_thresholds`: set each RSign threshold beta_c to the channel's median on real
  images, so every channel splits half +1 / half -1 (the most information one bit can carry).
- `one_sided_share`: the share of binary-conv input channels whose values are more than
  95 % of one sign: the measure of that loss, before and after calibration.
- `reestimate_batchnorm`: recompute BatchNorm running statistics on training images
  (Nagel et al., ICML 2022), for after the last step or after calibration.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

ONE_SIDED = 0.95  # a channel is one-sided when more than this share of values has one sign
MAX_VALUES_PER_CHANNEL = 1 << 20  # medians over at most this many values (evenly subsampled)


def _binary_convs(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Training-form and deploy-form binary convs alike: both have shifted_input()."""
    from recu_cli.binarize.layers import BinaryConv2d, ReCUConv2d

    return [(n, m) for n, m in model.named_modules() if isinstance(m, (ReCUConv2d, BinaryConv2d))]


def _channel_values(x: torch.Tensor) -> torch.Tensor:
    """[C, N*H*W] view of an NCHW tensor, evenly subsampled to a bounded size per channel."""
    values = x.detach().transpose(0, 1).reshape(x.shape[1], -1)
    step = -(-values.shape[1] // MAX_VALUES_PER_CHANNEL)
    return values[:, ::step].float()


def lower_median(values: torch.Tensor) -> torch.Tensor:
    """Per-row median as torch.median gives it (the lower middle value). On CUDA under
    deterministic algorithms (--deterministic) median(dim) raises: the same value is read
    from a sort there."""
    if values.is_cuda and torch.are_deterministic_algorithms_enabled():
        return values.sort(dim=1).values[:, (values.shape[1] - 1) // 2]
    return values.median(dim=1).values


@torch.no_grad()
def calibrate_thresholds(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> int:
    """Set every learnable threshold to its channel's median over `images`; returns how many
    layers were calibrated.

    One pass in eval mode: a pre-hook sets each layer's threshold from the input it receives
    before the layer runs, so later layers see the already calibrated earlier ones. The
    images go through in one batch of up to `batch_size` (medians need all values at once).
    """
    layers = [(n, m) for n, m in _binary_convs(model) if m.act_threshold is not None]
    if not layers:
        return 0

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        values = _channel_values(args[0])
        module.act_threshold.copy_(lower_median(values).to(module.act_threshold.dtype))

    was_training = model.training
    model.eval()
    handles = [m.register_forward_pre_hook(hook) for _, m in layers]
    try:
        model(images[:batch_size])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return len(layers)


@torch.no_grad()
def sign_balance(
    model: nn.Module, images: torch.Tensor, batch_size: int = 256
) -> dict[str, torch.Tensor]:
    """Per binary conv: the share of +1 signs of each input channel (after its threshold)."""
    plus: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = module.shifted_input(args[0])
            p = (x >= 0).sum(dim=(0, 2, 3)).double()
            plus[name] = plus.get(name, 0) + p
            counts[name] = counts.get(name, 0) + x.shape[0] * x.shape[2] * x.shape[3]

        return hook

    was_training = model.training
    model.eval()
    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in _binary_convs(model)]
    try:
        for start in range(0, images.shape[0], batch_size):
            model(images[start : start + batch_size])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {n: (plus[n] / counts[n]).float() for n in plus}


def one_sided_share(balance: dict[str, torch.Tensor], limit: float = ONE_SIDED) -> float:
    """Share of input channels (over all binary convs) with more than `limit` of one sign."""
    shares = torch.cat([b.reshape(-1) for b in balance.values()]) if balance else torch.zeros(0)
    if shares.numel() == 0:
        return 0.0
    one_sided = (shares > limit) | (shares < 1.0 - limit)
    return float(one_sided.double().mean())


@torch.no_grad()
def reestimate_batchnorm(
    model: nn.Module, batches: Iterable[torch.Tensor], device: torch.device | str = "cpu"
) -> int:
    """Recompute every BatchNorm's running mean/var as the plain average over `batches`.

    Only the BatchNorms run in train mode (momentum None = cumulative average); the rest of
    the model stays in eval, so nothing else changes. Returns the number of batches used.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    was_training = model.training
    saved = [(m.momentum, m.training) for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    used = 0
    try:
        for x in batches:
            model(x.to(device, non_blocking=True))
            used += 1
    finally:
        for m, (momentum, _) in zip(bns, saved, strict=True):
            m.momentum = momentum
        model.train(was_training)
    return used


def take_images(loader: Iterable, n: int) -> torch.Tensor:
    """The first n images of a loader of (images, targets) batches, as one tensor."""
    out: list[torch.Tensor] = []
    have = 0
    for images, _ in loader:
        if images.shape[0] == 0:  # every image of the batch was unreadable
            continue
        out.append(images)
        have += images.shape[0]
        if have >= n:
            break
    if not out:
        return torch.zeros(0)
    return torch.cat(out)[:n]


def image_batches(loader: Iterable, n_batches: int) -> Iterator[torch.Tensor]:
    """The images of the first n batches of a loader of (images, targets)."""
    for i, (images, _) in enumerate(loader):
        if i >= n_batches:
            return
        if images.shape[0]:  # 0 when every image of the batch was unreadable
            yield images
