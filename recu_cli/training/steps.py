"""One optimizer step, one validation pass, and the row an epoch leaves in summary.csv."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from recu_cli.accuracy import EvalResult, evaluate
from recu_cli.bnn import binary_layers
from recu_cli.training.config import TrainConfig
from recu_cli.training.distill import attention_loss, distillation_loss
from recu_cli.training.distributed import DistInfo, agree, all_reduce_sum
from recu_cli.training.parts import Parts
from recu_cli.training.state import TrainState
from recu_cli.training.switch import model_sign_gap
from recu_cli.training.trackers import FlipTracker


def autocast(parts: Parts, cache: bool = True) -> contextlib.AbstractContextManager:
    """--amp's autocast; nothing at all without it. cache=False for CUDA-graph capture
    (autocast's cache of cast weights must not outlive a captured region)."""
    if parts.amp_dtype is None:
        return contextlib.nullcontext()
    kw = {} if cache else {"cache_enabled": False}
    return torch.autocast(parts.device.type, dtype=parts.amp_dtype, **kw)


def train_step(
    cfg: TrainConfig, parts: Parts, images: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """One optimizer step; returns the loss as a device tensor (no host sync here).

    With --compile, `parts.fast` (training/fast_step.py) runs the same two halves below,
    compiled and, on CUDA, captured as one graph."""
    images = images.to(parts.device, non_blocking=True)
    targets = targets.to(parts.device, non_blocking=True)
    if cfg.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    if parts.fast is not None:
        return parts.fast.step(images, targets)
    return apply_gradients(cfg, parts, forward_loss(cfg, parts, images, targets))


def forward_loss(
    cfg: TrainConfig, parts: Parts, images: torch.Tensor, targets: torch.Tensor,
    cache: bool = True,
) -> torch.Tensor:  # fmt: skip
    """The training loss of one batch: student forward, cross-entropy, distillation from
    the teacher's logits and features, stage 1's binarization penalty. No host sync (it is
    what --compile compiles)."""
    if parts.features is not None:
        for tap in parts.features:
            tap.clear()
    with autocast(parts, cache):
        logits = parts.ddp_model(images)
        loss = F.cross_entropy(logits.float(), targets)
        if parts.teacher is not None:
            with torch.no_grad():
                soft = parts.teacher(images)
            kd = distillation_loss(logits, soft, cfg.kd_temperature)
            loss = (1.0 - cfg.kd_weight) * loss + cfg.kd_weight * kd
        if parts.features is not None:
            student_tap, teacher_tap = parts.features
            at = attention_loss(student_tap.take(), teacher_tap.take())
            loss = loss + parts.attention_weight.tensor * at
    if parts.sign_penalty is not None:
        penalty = parts.sign_penalty.term(parts.model)
        if penalty is not None:
            loss = loss + penalty
    return loss


def apply_gradients(cfg: TrainConfig, parts: Parts, loss: torch.Tensor) -> torch.Tensor:
    """Backward and optimizer step (grad scaler and clipping included); the loss, detached."""
    optimizer, scaler = parts.optimizer, parts.scaler
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if cfg.clip_grad:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(parts.model.parameters(), cfg.clip_grad)
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


def validate(
    parts: Parts, info: DistInfo, channels_last: bool, model: nn.Module | None = None
) -> EvalResult:
    """`evaluate` on this process's share of the validation images, agreed over all
    processes. In fp32 even with --amp, as `recu eval` measures the saved model: val_top1
    and the choice of best are the numbers the checkpoint gives."""
    return evaluate(
        parts.model if model is None else model,
        parts.val_loader,
        parts.device,
        description="validation",
        channels_last=channels_last,
        agree=lambda totals: agree(totals, info),
        stop_on_nonfinite=False,
    )


def epoch_row(
    parts: Parts, state: TrainState, info: DistInfo, val: EvalResult, seconds: float,
    images_seen: int, warmup: tuple[float, int] = (0.0, 0), live: EvalResult | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The epoch's summary.csv row (collective: every rank calls it). `seconds` is the
    epoch's wall time; img/s leaves out `warmup` (--compile's compile and capture steps:
    seconds, images), which train.log states once. `val` is the packed model's (the
    --ema-decay average, whose dead weights are counted too), `live` the last step's
    weights' where they differ; flips and the sign gap are the training weights'."""
    from recu_cli.stats import dead_weight_counts, share_of, to_host

    with torch.no_grad():  # a statistic: no graph for the gap's weight path
        gap = model_sign_gap(parts.model)
    skipped = all_reduce_sum([float(state.skipped.epoch)], info, parts.device)[0]
    weights = to_host(  # the weight statistics, computed on the device, read in one transfer
        {
            "tau": binary_layers(parts.model)[0][1].tau,
            "dead": dead_weight_counts(parts.packed_model()),
            "flips": state.flips.count_tensor(parts.model),
            "gap": gap,
        }
    )
    return {
        "epoch": state.pos.epoch + 1,
        "stage": state.stage,
        "lr": float(parts.optimizer.param_groups[0]["lr"]),
        "tau": weights["tau"],
        "train_loss": state.metrics.epoch_mean(info),
        "val_top1": val.top1,
        "val_top5": val.top5,
        "val_loss": val.loss,
        "val_top1_live": (val if live is None else live).top1,
        "dead_share": share_of(weights["dead"]),
        **FlipTracker.rates_from(weights["flips"]),
        "seconds": seconds,
        "img_per_s": steady_rate(images_seen, seconds, warmup) * info.world_size,
        "skipped_images": int(skipped),
        "sign_gap": weights["gap"],
    }


def steady_rate(images: int, seconds: float, warmup: tuple[float, int]) -> float:
    """Images per second without the warm-up steps; with the warm-up when nothing else ran."""
    warm_s, warm_n = warmup
    if images > warm_n and seconds > warm_s:
        images, seconds = images - warm_n, seconds - warm_s
    return images / max(seconds, 1e-9)


def epoch_line(row: dict[str, Any], epochs: int, is_best: bool) -> str:
    return (
        f"epoch {row['epoch']}/{epochs}: train loss {row['train_loss']:.4f}  "
        f"val top-1 {row['val_top1']:.2f}%  top-5 {row['val_top5']:.2f}%  tau {row['tau']:.4f}  "
        f"dead {100 * row['dead_share']:.1f}%  flips {100 * row['flip_rate']:.2f}% "
        f"(tail {100 * row['flip_rate_tail']:.2f}%, "
        f"core {100 * row['flip_rate_core']:.2f}%)"
        f"  {row['seconds']:.0f}s {row['img_per_s']:.0f} img/s"
        + ("  *best*" if is_best else "")
        + ("  (stage 1: real weights, no packed checkpoint yet)" if row["stage"] == 1 else "")
    )
