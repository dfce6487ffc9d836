"""Unreadable images: named, counted, and never a loader-worker traceback.

An image that fails to load becomes a `BadItem` (path and reason) inside the dataset,
so it crosses loader-worker processes as data, not as an exception (PyTorch re-raises
worker exceptions with the worker's whole traceback in the message). `collate` drops
bad items from a batch and hands them on in `Batch.bad`; training skips them with a
warning, validation and `recu eval` stop with one line naming the file. `check_tree`
opens every image's header before training, so a bad validation image costs seconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import default_collate
from torchvision import datasets

from recu_cli.errors import RecuError

JPEG_END = b"\xff\xd9"


class BadItem:
    """Stands in for an image that could not be read; indexing it raises one clean line."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason

    def message(self) -> str:
        return f"unreadable image {self.path} ({self.reason})"

    def __getitem__(self, i: int) -> Any:
        raise RecuError(self.message() + "; remove or replace it")


class CheckedImageFolder(datasets.ImageFolder):
    """ImageFolder whose unreadable images come back as BadItem, not as an exception."""

    def __getitem__(self, index: int) -> Any:
        try:
            return super().__getitem__(index)
        except Exception as e:  # noqa: BLE001 - any decode/transform failure names the file
            path = self.samples[index][0]
            return BadItem(path, reason(Path(path), e))


class Batch(tuple):
    """(images, targets) that also carries the bad items dropped from it."""

    bad: tuple[BadItem, ...]

    def __new__(cls, images: torch.Tensor, targets: torch.Tensor, bad=()) -> Batch:
        self = super().__new__(cls, (images, targets))
        self.bad = tuple(bad)
        return self

    def __getnewargs__(self):  # pickling across loader workers keeps `bad`
        return (self[0], self[1], self.bad)

    def pin_memory(self) -> Batch:
        return Batch(self[0].pin_memory(), self[1].pin_memory(), self.bad)


def collate(items: list[Any]) -> Batch:
    """default_collate of the readable items; an all-bad batch has 0 images."""
    good = [it for it in items if not isinstance(it, BadItem)]
    bad = [it for it in items if isinstance(it, BadItem)]
    if not good:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), bad)
    images, targets = default_collate(good)
    return Batch(images, targets, bad)


def bad_of(batch: Any) -> tuple[BadItem, ...]:
    return getattr(batch, "bad", ())


def fail_on_bad(batch: Any, what: str = "validation") -> None:
    """Validation and eval need every image: the first bad one stops with one line."""
    bad = bad_of(batch)
    if bad:
        raise RecuError(
            f"{bad[0].message()}: {what} needs every image; remove or replace it", exit_code=1
        )


def reason(path: Path, e: BaseException) -> str:
    """Why an image failed, in words, without repeating the path."""
    try:
        if path.stat().st_size == 0:
            return "empty file, 0 bytes"
    except OSError as err:
        return err.strerror or type(err).__name__
    name = type(e).__name__
    text = str(e).splitlines()[0] if str(e) else ""
    if name == "UnidentifiedImageError":
        return "not an image file PIL can read"
    if "truncated" in text.lower():
        return "truncated image"
    text = text.replace(repr(str(path)), "").replace(str(path), "").strip(" :")
    return f"{name}: {text[:120]}" if text else name


def check_file(path: Path) -> str | None:
    """None when `path` looks like a readable image, else the reason. Opens the header;
    a JPEG without its end marker is decoded in full to tell a truncated file."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            fmt = im.format
            if fmt == "JPEG":
                with open(path, "rb") as f:
                    f.seek(-2, 2)
                    if f.read(2) != JPEG_END:
                        im.load()
            else:
                im.verify()
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
        return reason(path, e)
    return None


def check_tree(ds: Any, what: str) -> None:
    """Header check of every image of an ImageFolder dataset; one line for the first bad."""
    samples = getattr(ds, "samples", None)
    if samples is None:  # torchvision/idx datasets: no image files to check
        return
    bad = []
    for p, _ in samples:
        why = check_file(Path(p))
        if why is not None:
            bad.append((p, why))
    if bad:
        more = f" ({len(bad)} bad files in {what}, first shown)" if len(bad) > 1 else ""
        raise RecuError(
            f"unreadable image {bad[0][0]} ({bad[0][1]}){more}; remove or replace it "
            "before training or evaluating"
        )
