"""Top-1 / top-5 accuracy of any classifier on a loader: the one evaluation loop.

`recu eval`, step 0 and training's validation all run `evaluate`; training adds the
agreement of its processes (`agree`: a sum over ranks of the [top-1, top-5, loss, n]
totals), so every rank reports the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from recu_cli.errors import RecuError
from recu_cli.imagecheck import fail_on_bad
from recu_cli.progress import make_progress


@dataclass
class EvalResult:
    top1: float
    top5: float
    loss: float
    images: int

    def to_dict(self) -> dict[str, float | int]:
        return {"top1": self.top1, "top5": self.top5, "loss": self.loss, "images": self.images}


def batch_sums(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[top-1 hits, top-5 hits (top-k for fewer classes), summed cross-entropy] as a float64
    tensor on the logits' device: summed over batches without a host sync per batch."""
    logits = logits.float()
    k = min(5, logits.shape[1])
    hits = logits.topk(k, dim=1).indices.eq(targets.view(-1, 1))
    loss = nn.functional.cross_entropy(logits, targets, reduction="sum")
    return torch.stack([hits[:, 0].sum().double(), hits.any(dim=1).sum().double(), loss.double()])


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    device: torch.device | str = "cpu",
    quiet: bool = True,
    description: str = "eval",
    max_batches: int | None = None,
    channels_last: bool = False,
    agree: Callable[[torch.Tensor], torch.Tensor] | None = None,
    stop_on_nonfinite: bool = True,
) -> EvalResult:
    """Accuracy in percent, as timm prints it; the loss is mean cross-entropy.

    In eval mode (the model's mode is restored after). Sums stay on the device: one host
    read at the end (and one per batch only for a shown progress bar). `agree` sums the
    totals over processes (training under torchrun); `description` names the pass in the
    progress bar and in the error about an unreadable image. `stop_on_nonfinite` reads each
    batch's loss (one small host read) and stops at the first NaN or infinite one, naming
    the layer: a top-1 over such logits would be a silent 10%. Training's validation turns
    it off (no sync per batch; its val_loss then shows the NaN).
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # top-1, top-5, loss, images
    total = len(loader) if max_batches is None else min(len(loader), max_batches)
    with make_progress(quiet) as progress:
        task = progress.add_task(description, total=total, info="")
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            fail_on_bad(batch, description)
            images, targets = batch
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            logits = model(images)
            counts = batch_sums(logits, targets)
            sums[:3] += counts
            sums[3] += targets.numel()
            if stop_on_nonfinite and not math.isfinite(float(counts[2])):
                raise not_finite(model, images, logits, i + 1)
            if not quiet:
                c1, n = sums[0].item(), sums[3].item()
                progress.update(task, advance=1, info=f"top-1 {100.0 * c1 / max(n, 1):.2f}%")
    model.train(was_training)
    if agree is not None:
        sums = agree(sums)
    c1, c5, loss_sum, n = sums.tolist()
    if n == 0:
        return EvalResult(0.0, 0.0, float("nan"), 0)
    return EvalResult(100.0 * c1 / n, 100.0 * c5 / n, loss_sum / n, int(n))


def not_finite(
    model: nn.Module, images: torch.Tensor, logits: torch.Tensor, batch: int
) -> RecuError:
    """Why the loss of a batch is NaN or infinite, naming the first layer whose output
    is not finite: a top-1 over such logits would be a silent 10%."""
    if not bool(torch.isfinite(images).all()):
        what = "the normalised input images hold NaN or infinite values"
    elif not bool(torch.isfinite(logits).all()):
        where = first_nonfinite_layer(model, images)
        what = "the logits are NaN or infinite" + (f" (first in layer {where})" if where else "")
    else:
        what = (
            f"the logits are finite but so large (max |logit| {float(logits.abs().max()):.3g}) "
            "that the cross-entropy overflows"
        )
    return RecuError(
        f"evaluation stopped at batch {batch}: {what}; the model's weights or normalisation "
        "overflow float32 (a damaged checkpoint, or one from a diverged run): no accuracy "
        "is reported for it"
    )


@torch.no_grad()
def first_nonfinite_layer(model: nn.Module, images: torch.Tensor) -> str | None:
    """Run the batch again with hooks: 'name (Type)' of the first module to finish with a
    NaN or infinite output (children finish before their parents), or None."""
    found: list[str] = []

    def hook(name: str):
        def check(module: nn.Module, _inputs: object, out: object) -> None:
            if found or not isinstance(out, torch.Tensor) or not out.is_floating_point():
                return
            if not bool(torch.isfinite(out).all()):
                found.append(f"'{name}' ({type(module).__name__})")

        return check

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        model(images)
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None
