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
    if not (_triple(size) and all(is_int(s, 1, 16384) for s in size)):
        raise _bad("input_size is not [channels, height, width]")
    for key in ("mean", "std"):
        v = d[key]
        if not (_triple(v) and all(is_num(x) for x in v)):
            raise _bad(f"{key} is not three numbers")
    if not all(x > 0 for x in d["std"]):
        raise _bad("std must be positive")
    if not isinstance(d["interpolation"], str) or not is_num(d["crop_pct"]) or d["crop_pct"] <= 0:
        raise _bad("interpolation/crop_pct have the wrong type")
