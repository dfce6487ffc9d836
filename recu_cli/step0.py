"""Step 0 of a conversion: how much accuracy and information the signs keep, before training.

`recu convert --data` and `recu binarize` report the same numbers; each brings its own way
to measure top-1 (a plain evaluation, or training's validation shared across processes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from recu_cli.convert_config import ConvertConfig
from recu_cli.spec import ModelSpec

Top1 = Callable[[nn.Module], float]


def step0_numbers(
    converted: nn.Module,
    images: torch.Tensor,
    median: bool,
    top1: Top1 | None = None,
    original: nn.Module | None = None,
) -> dict[str, Any]:
    """{"fp_top1", "before": {"top1", "one_sided_share"}, "after": {...}}: fp_top1 with
    the original and top1 only with a `top1` measure, after only with median thresholds
    (calibrated here, in place, on `images`)."""
    from recu_cli.calibrate import calibrate_thresholds, one_sided_share, sign_balance

    def measure(model: nn.Module) -> dict[str, float]:
        share = one_sided_share(sign_balance(model, images))
        return (
            {"top1": top1(model), "one_sided_share": share} if top1 else {"one_sided_share": share}
        )

    step0: dict[str, Any] = {}
    if original is not None and top1 is not None:
        step0["fp_top1"] = top1(original)
    step0["before"] = measure(converted)
    if median:
        calibrate_thresholds(converted, images)
        step0["after"] = measure(converted)
    return step0


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
    """Step 0 of `recu convert --data`: validation by a plain evaluation of `data`."""
    from recu_cli.accuracy import evaluate
    from recu_cli.data import build_data, calibration_images, make_loader

    bundle = build_data(data, spec, train=True)
    loader = make_loader(bundle.val, batch_size, workers)
    images = calibration_images(bundle, calib_images, seed)
    median = config.act_threshold == "median"
    return step0_numbers(converted, images, median, lambda m: evaluate(m, loader).top1, original)


def describe_step0(step0: dict[str, Any]) -> str:
    """One line: what conversion kept, before any training step."""
    parts = []
    if "fp_top1" in step0:
        parts.append(f"full precision {step0['fp_top1']:.2f}%")
    for key, label in (("before", "converted"), ("after", "after calibration")):
        d = step0.get(key)
        if d:
            acc = f" {d['top1']:.2f}%" if "top1" in d else ""
            parts.append(f"{label}{acc} ({100 * d['one_sided_share']:.1f}% one-sided channels)")
    return ", ".join(parts)
