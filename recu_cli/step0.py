"""Step 0 of a conversion: how much accuracy and information the signs keep, before training."""

from __future__ import annotations

from typing import Any

from torch import nn

from recu_cli.convert import ConvertConfig
from recu_cli.models import ModelSpec


def measure_step0(
    original: nn.Module,
    converted: nn.Module,
    config: ConvertConfig,
    spec: ModelSpec,
    data: str,
    calib_images: int,
    batch_size: int,
    workers: int,
    seed: int = 0,
) -> dict[str, Any]:
    """{"fp_top1", "before": {"top1", "one_sided_share"}, "after": {...}} (after only when
    the recipe has median thresholds); calibrates `converted` in place."""
    from recu_cli.calibrate import calibrate_thresholds, one_sided_share, sign_balance
    from recu_cli.data import build_data, calibration_images, make_loader
    from recu_cli.evaluate import evaluate

    bundle = build_data(data, spec, train=True)
    loader = make_loader(bundle.val, batch_size, workers)
    images = calibration_images(bundle, calib_images, seed)

    def measure(model: nn.Module) -> dict[str, float]:
        return {
            "top1": evaluate(model, loader).top1,
            "one_sided_share": one_sided_share(sign_balance(model, images)),
        }

    step0: dict[str, Any] = {"fp_top1": evaluate(original, loader).top1}
    step0["before"] = measure(converted)
    if config.act_threshold == "median":
        calibrate_thresholds(converted, images)
        step0["after"] = measure(converted)
    return step0
