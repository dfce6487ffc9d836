"""`ModelSpec`: which model a checkpoint holds and how to feed it. No torch, so reading a
packed file's metadata stays fast."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from recu_cli.fields import FieldError, is_int, is_num

SOURCES = ("timm", "torchvision")
# ImageNet's normalisation: timm's default, and what recu's CIFAR zoo models were trained with
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Bounds a real model's spec has (every timm pretrained config: 3 channels, sides 106 to
# 1024, mean 0 to 0.5, std 0.14 to 1, crop_pct 0.875 to 1.15; CIFAR 32, MNIST 28). A file
# beyond them is crafted or damaged, and would drive memory or the maths off a cliff.
CHANNELS = 3  # mean and std hold three values, and every registered stem takes RGB
MIN_SIDE, MAX_SIDE = 8, 1024
MEAN_RANGE = (-1.0, 2.0)  # images are in [0, 1] when they are normalised
STD_RANGE = (0.01, 10.0)  # bounded away from 0: x / 1e-300 is inf
CROP_PCT_RANGE = (0.5, 2.0)  # the eval resize is side / crop_pct
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos", "random")
MAX_BATCH_PIXELS = 32 * MAX_SIDE * MAX_SIDE  # 32 images at the largest side: 400 MB of input


@dataclass(frozen=True)
class ModelSpec:
    """What recu needs to rebuild the model and feed it: recorded in every checkpoint."""

    name: str  # architecture name inside its source, e.g. "resnet18"
    source: str  # "timm" or "torchvision"
    num_classes: int
    input_size: tuple[int, int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    crop_pct: float

    @property
    def full_name(self) -> str:
        return self.name if self.source == "timm" else f"tv:{self.name}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> ModelSpec:
        """Check every field (types and bounds; keys it does not know are ignored)."""
        _check(d)
        return cls(
            name=str(d["name"]),
            source=str(d["source"]),
            num_classes=int(d["num_classes"]),
            input_size=tuple(int(v) for v in d["input_size"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
            interpolation=str(d["interpolation"]),
            crop_pct=float(d["crop_pct"]),
        )


def _bad(what: str) -> FieldError:
    return FieldError(f"model spec: {what}", what)


def _triple(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and len(v) == 3


def _check(d: Any) -> None:
    if not isinstance(d, dict):
        raise _bad("not a JSON object")
    missing = [k for k in ModelSpec.__dataclass_fields__ if k not in d]
    if missing:
        raise _bad(f"missing {', '.join(missing)}")
    if not isinstance(d["name"], str) or not 0 < len(d["name"]) <= 200:
        raise _bad("name is not a short string")
    if d["source"] not in SOURCES:
        raise _bad("source must be 'timm' or 'torchvision'")
    if not is_int(d["num_classes"], 1, 10_000_000):
        raise _bad("num_classes is not a positive integer")
    size = d["input_size"]
    if not (_triple(size) and all(is_int(s, 1, 1 << 30) for s in size)):
        raise _bad("input_size is not [channels, height, width]")
    if size[0] != CHANNELS:
        raise _bad(f"input_size has {size[0]} channels; recu models take {CHANNELS} (RGB)")
    if not all(MIN_SIDE <= s <= MAX_SIDE for s in size[1:]):
        raise _bad(f"input_size {size[1]}x{size[2]} is outside {MIN_SIDE}..{MAX_SIDE} pixels")
    for key, (lo, hi) in (("mean", MEAN_RANGE), ("std", STD_RANGE)):
        v = d[key]
        if not (_triple(v) and all(is_num(x) for x in v)):
            raise _bad(f"{key} is not three numbers")
        if not all(lo <= x <= hi for x in v):
            raise _bad(f"{key} {list(v)} is outside {lo:g}..{hi:g} (images are in [0, 1])")
    if d["interpolation"] not in INTERPOLATIONS:
        raise _bad(f"interpolation is not one of {', '.join(INTERPOLATIONS)}")
    lo, hi = CROP_PCT_RANGE
    if not (is_num(d["crop_pct"]) and lo <= d["crop_pct"] <= hi):
        raise _bad(f"crop_pct is not a number in {lo:g}..{hi:g}")


def check_batch(n: int, input_size: tuple[int, ...] | list[int], flag: str) -> None:
    """A batch of n images at this size fits MAX_BATCH_PIXELS (the input alone is
    12 bytes a pixel; activations many times that)."""
    from recu_cli.errors import RecuError

    h, w = int(input_size[-2]), int(input_size[-1])
    most = max(1, MAX_BATCH_PIXELS // (h * w))
    if n > most:
        raise RecuError(
            f"{flag} {n} is too large at input size {h}x{w} ({n * 12 * h * w / 1e9:.1f} GB of "
            f"input alone); use at most {most} images at this size"
        )
