"""Decode a dataset once, through its deterministic steps, into one uint8 tensor.

The dataset's own __getitem__ runs with its transform replaced by the plan's deterministic
prefix (Grayscale, Resize) and PILToTensor, so every image is opened, converted and resized
exactly as the PIL path does it, once. Unreadable images come back as imagecheck.BadItem
(CheckedImageFolder) and are recorded by index with their reason.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from recu_cli.imagecheck import BadItem


class ShapeMismatch(Exception):
    """The decoded images do not all have one shape (the resident path needs one tensor)."""


@dataclass
class Decoded:
    """uint8 images [N, C, H, W] (zeros where unreadable), int64 targets [N], and the
    unreadable ones by index: (path, reason)."""

    images: torch.Tensor
    targets: torch.Tensor
    bad: dict[int, tuple[str, str]] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.targets.numel())

    def bad_item(self, i: int) -> BadItem:
        path, why = self.bad[i]
        return BadItem(path, why)


def _as_list(items: list) -> list:
    return items


def targets_of(ds: Dataset) -> list[int] | None:
    """Labels without decoding (ImageFolder, torchvision sets, IDX files), or None."""
    targets = getattr(ds, "targets", None)
    if targets is None:
        return None
    return [int(t) for t in targets]


def decode(ds: Dataset, prefix: tuple, shape: tuple[int, int, int], workers: int) -> Decoded:
    """Every item of `ds` through `prefix` + PILToTensor, into one tensor of `shape` per
    image; ShapeMismatch at the first image of another shape."""
    view = copy.copy(ds)
    view.transform = T.Compose([*prefix, T.PILToTensor()])
    n = len(view)
    images = torch.zeros((n, *shape), dtype=torch.uint8)
    targets = torch.full((n,), -1, dtype=torch.long)
    known = targets_of(ds)
    bad: dict[int, tuple[str, str]] = {}
    loader = DataLoader(
        view, batch_size=256, num_workers=workers, collate_fn=_as_list, shuffle=False
    )
    i = 0
    for items in loader:
        for item in items:
            if isinstance(item, BadItem):
                bad[i] = (item.path, item.reason)
                if known is not None:
                    targets[i] = known[i]
            else:
                image, target = item
                if tuple(image.shape) != shape:
                    raise ShapeMismatch(
                        f"image {i} decodes to {tuple(image.shape)}, not {shape}: images of "
                        "different sizes"
                    )
                images[i] = image
                targets[i] = int(target)
            i += 1
    return Decoded(images, targets, bad)
