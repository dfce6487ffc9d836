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


def autocast(parts: Parts) -> contextlib.AbstractContextManager:
    """--amp's autocast; nothing at all without it."""
    if parts.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(parts.device.type, dtype=parts.amp_dtype)


def train_step(
    cfg: TrainConfig, parts: Parts, images: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """One optimizer step; returns the loss as a device tensor (no host sync here)."""
    images = images.to(parts.device, non_blocking=True)
    targets = targets.to(parts.device, non_blocking=True)
    if cfg.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with autocast(parts):
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
            loss = loss + cfg.feature_kd * at
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
    )


def epoch_row(
    parts: Parts, state: TrainState, info: DistInfo, val: EvalResult, seconds: float,
    images_seen: int,
) -> dict[str, Any]:  # fmt: skip
    """The epoch's summary.csv row (collective: every rank calls it)."""
    from recu_cli.stats import dead_weight_share

    skipped = all_reduce_sum([float(state.skipped.epoch)], info, parts.device)[0]
    return {
        "epoch": state.pos.epoch + 1,
        "stage": state.stage,
        "lr": float(parts.optimizer.param_groups[0]["lr"]),
        "tau": float(binary_layers(parts.model)[0][1].tau),
        "train_loss": state.metrics.epoch_mean(info),
        "val_top1": val.top1,
        "val_top5": val.top5,
        "val_loss": val.loss,
        "dead_share": dead_weight_share(parts.model),
        **state.flips.rates(parts.model),
        "seconds": seconds,
        "img_per_s": images_seen * info.world_size / max(seconds, 1e-9),
        "skipped_images": int(skipped),
    }


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
