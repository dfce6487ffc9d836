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


def _collate(items: list) -> tuple:
    """A batch as one tensor (one shared-memory block, not one per image, crosses from a
    worker), the labels and positions of its readable images, its unreadable ones, and the
    shapes met (more than one: the caller stops)."""
    good = [(k, it) for k, it in enumerate(items) if not isinstance(it, BadItem)]
    bad = [(k, it.path, it.reason) for k, it in enumerate(items) if isinstance(it, BadItem)]
    shapes = sorted({tuple(it[0].shape) for _, it in good})
    if len(shapes) != 1:
        return None, [], bad, shapes
    images = torch.stack([it[0] for _, it in good])
    return images, [(k, int(it[1])) for k, it in good], bad, shapes


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
    batch = 256
    loader = DataLoader(view, batch_size=batch, num_workers=workers, collate_fn=_collate)
    for b, (stacked, labels, unreadable, shapes) in enumerate(loader):
        base = b * batch
        for k, path, why in unreadable:
            bad[base + k] = (path, why)
            if known is not None:
                targets[base + k] = known[base + k]
        if shapes and shapes != [shape]:
            other = next(s for s in shapes if s != shape)
            raise ShapeMismatch(f"images decode to {other}, not {shape}: images of different sizes")
        if stacked is not None:
            pos = torch.tensor([base + k for k, _ in labels], dtype=torch.long)
            images[pos] = stacked
            targets[pos] = torch.tensor([t for _, t in labels], dtype=torch.long)
    return Decoded(images, targets, bad)
