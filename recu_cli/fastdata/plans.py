"""What a fast path must reproduce, read from the very transforms the PIL path runs.

`data.build_transform` stays the one definition of recu's augmentation; a fast path reads
its steps here and refuses (with the reason, so the PIL path runs instead) any step it
does not reproduce. So a change to build_transform can never make a fast path train on
another distribution silently.
"""

from __future__ import annotations

from dataclasses import dataclass

from torchvision import transforms as T

BILINEAR_OR_BICUBIC = ("bilinear", "bicubic")


class Unsupported(Exception):
    """A transform step this fast path does not reproduce (the message says which)."""


@dataclass(frozen=True)
class Normalise:
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class SmallPlan:
    """build_transform for small (<= 64 px) inputs: deterministic steps (Grayscale, Resize),
    then RandomCrop(size, padding) + RandomHorizontalFlip (training only), ToTensor, Normalize."""

    prefix: tuple  # the deterministic PIL steps, run once at decode time
    size: int
    pad: int  # 0 and no flip: the validation transform
    flip: bool
    norm: Normalise

    def prefix_repr(self) -> str:
        return " | ".join(repr(t).replace("\n", " ") for t in self.prefix)


@dataclass(frozen=True)
class JpegTrainPlan:
    """timm's training transform: RandomResizedCrop, flip, ColorJitter, ToTensor, Normalize.
    `steps` are the transform objects whose own get_params draw each image's parameters."""

    size: int
    crop: object  # timm RandomResizedCropAndInterpolation or torchvision RandomResizedCrop
    flip: float  # probability; 0 = no flip step
    jitter: object | None  # torchvision ColorJitter without hue, or None
    interpolation: str
    norm: Normalise


@dataclass(frozen=True)
class JpegEvalPlan:
    """timm's eval transform: Resize(shorter side) + CenterCrop, ToTensor, Normalize."""

    resize: int
    size: int
    interpolation: str
    norm: Normalise


def _steps(tf) -> list:
    return list(tf.transforms) if isinstance(tf, T.Compose) else [tf]


def _name(step) -> str:
    return type(step).__name__


def _normalise(steps: list) -> Normalise:
    """The last two steps must be ToTensor (or timm's MaybeToTensor) and Normalize."""
    if len(steps) < 2 or _name(steps[-2]) not in ("ToTensor", "MaybeToTensor"):
        raise Unsupported("the transform does not end in ToTensor, Normalize")
    norm = steps[-1]
    if not isinstance(norm, T.Normalize):
        raise Unsupported(f"the transform ends in {_name(norm)}, not Normalize")
    as_tuple = lambda v: tuple(float(x) for x in (v.tolist() if hasattr(v, "tolist") else v))  # noqa: E731
    return Normalise(as_tuple(norm.mean), as_tuple(norm.std))


def _interp(step) -> str:
    mode = getattr(step, "interpolation", None)
    name = getattr(mode, "value", mode)
    return str(name).lower()


def small_plan(tf, train: bool) -> SmallPlan:
    """The plan of build_transform's small-input transform; Unsupported otherwise."""
    steps = _steps(tf)
    norm = _normalise(steps)
    body = steps[:-2]
    prefix = []
    while body and isinstance(body[0], (T.Grayscale, T.Resize)):
        prefix.append(body.pop(0))
    resize = [s for s in prefix if isinstance(s, T.Resize)]
    if len(resize) != 1 or not isinstance(resize[0].size, (int, list, tuple)):
        raise Unsupported("the transform has no single Resize(size)")
    size = resize[0].size if isinstance(resize[0].size, int) else resize[0].size[0]
    pad, flip = 0, False
    if train:
        if len(body) != 2 or not isinstance(body[0], T.RandomCrop):
            raise Unsupported(f"training steps {[_name(s) for s in body]} are not RandomCrop, flip")
        crop, hflip = body
        if (
            crop.size != (size, size)
            or crop.pad_if_needed
            or crop.fill != 0
            or crop.padding_mode != "constant"
            or not isinstance(crop.padding, int)
        ):
            raise Unsupported(f"{crop!r} is not a zero-padded square crop of the input size")
        if not isinstance(hflip, T.RandomHorizontalFlip) or hflip.p != 0.5:
            raise Unsupported(f"{_name(hflip)} is not RandomHorizontalFlip(p=0.5)")
        pad, flip = crop.padding, True
    elif body:
        raise Unsupported(f"validation steps {[_name(s) for s in body]} are not deterministic")
    return SmallPlan(tuple(prefix), int(size), int(pad), flip, norm)


def jpeg_train_plan(tf) -> JpegTrainPlan:
    """The plan of timm's training transform (create_transform(is_training=True))."""
    steps = _steps(tf)
    norm = _normalise(steps)
    body = steps[:-2]
    if not body or _name(body[0]) not in ("RandomResizedCropAndInterpolation", "RandomResizedCrop"):
        raise Unsupported("the training transform does not start with RandomResizedCrop")
    crop = body.pop(0)
    interp = _interp(crop)
    if interp not in BILINEAR_OR_BICUBIC:
        raise Unsupported(f"{interp} interpolation (the GPU path resamples bilinear or bicubic)")
    size = crop.size if isinstance(crop.size, int) else crop.size[0]
    if not isinstance(crop.size, int) and crop.size[0] != crop.size[1]:
        raise Unsupported(f"a non-square crop {crop.size}")
    flip = 0.0
    if body and isinstance(body[0], T.RandomHorizontalFlip):
        flip = float(body.pop(0).p)
    jitter = None
    if body and isinstance(body[0], T.ColorJitter):
        jitter = body.pop(0)
        if jitter.hue is not None:
            raise Unsupported("ColorJitter with hue")
    if body:
        raise Unsupported(f"training step {_name(body[0])} (not reproduced on the GPU)")
    return JpegTrainPlan(int(size), crop, flip, jitter, interp, norm)


def jpeg_eval_plan(tf) -> JpegEvalPlan:
    """The plan of timm's eval transform: Resize(int) then CenterCrop(square)."""
    steps = _steps(tf)
    norm = _normalise(steps)
    body = steps[:-2]
    if len(body) != 2 or not isinstance(body[0], T.Resize) or not isinstance(body[1], T.CenterCrop):
        raise Unsupported(f"eval steps {[_name(s) for s in body]} are not Resize, CenterCrop")
    resize, crop = body
    size = resize.size if isinstance(resize.size, int) else None
    if isinstance(resize.size, (list, tuple)) and len(resize.size) == 1:
        size = resize.size[0]
    if size is None or resize.max_size is not None:
        raise Unsupported(f"{resize!r} does not resize the shorter side")
    if crop.size[0] != crop.size[1]:
        raise Unsupported(f"a non-square center crop {crop.size}")
    interp = _interp(resize)
    if interp not in BILINEAR_OR_BICUBIC:
        raise Unsupported(f"{interp} interpolation (the GPU path resamples bilinear or bicubic)")
    return JpegEvalPlan(int(size), int(crop.size[0]), interp, norm)
