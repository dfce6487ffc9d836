"""A decoded training set held as uint8 on the training device, augmented there in batches.

The augmentation is build_transform's for small inputs: a zero-padded random crop, a
horizontal flip with probability 1/2, ToTensor and Normalize. For a given crop and flip,
`augment` gives the PIL path's tensor bit for bit (the same float operations in the same
order); the crops and flips themselves come from a table drawn per (seed, epoch) by a CPU
generator and indexed by the image's index, so an image's augmentation depends only on
(seed, epoch, index): a resumed run sees what the uninterrupted one saw, on any device.
The draws differ from the PIL path's (which seeds a generator per image, ~50 us each):
same distribution, other samples.

Batches come from training/sampling.EpochBatchSampler, as the PIL loader's do, so the
order, the steps per epoch and the unreadable images met per batch are the PIL path's.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from recu_cli.fastdata.decode import Decoded
from recu_cli.imagecheck import BadItem, Batch


class ResidentSet:
    """Decoded images and labels on `device`; the unreadable ones by index (host side)."""

    def __init__(self, decoded: Decoded, device: torch.device, mean, std) -> None:
        self.device = device
        self.n = len(decoded)
        pin = device.type == "cuda"
        images = decoded.images.pin_memory() if pin else decoded.images
        self.images = images.to(device, non_blocking=pin)
        self.targets = decoded.targets.to(device)
        self.bad: dict[int, BadItem] = {i: decoded.bad_item(i) for i in decoded.bad}
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)

    @property
    def nbytes(self) -> int:
        return self.images.numel()

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """ToTensor then Normalize, as torchvision computes them (bit for bit)."""
        return x.to(torch.float32).div(255).sub_(self.mean).div_(self.std)

    def split_bad(self, idx: list[int]) -> tuple[list[int], list[BadItem]]:
        good = [i for i in idx if i not in self.bad]
        return good, [self.bad[i] for i in idx if i in self.bad]


def table_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + 0x5EED) % (2**63 - 1)


def augment_table(seed: int, epoch: int, n: int, pad: int) -> torch.Tensor:
    """[n, 3] int64: row i = (crop top, crop left, flip) of image i in this epoch; crop
    offsets uniform in 0..2*pad (in the padded image), flip 0 or 1 with probability 1/2."""
    g = torch.Generator().manual_seed(table_seed(seed, epoch))
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=g)
    flips = torch.randint(0, 2, (n, 1), generator=g)
    return torch.cat([offsets, flips], dim=1)


def augment(images: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor, pad: int) -> torch.Tensor:
    """uint8 crops of images[idx] zero-padded by `pad`, at offsets rows[:, 0:2] of the
    padded image, mirrored where rows[:, 2] is 1 (RandomCrop, then RandomHorizontalFlip).

    The padded batch viewed as all its crop windows [B, C, 2p+1, 2p+1, H, W] (a strided
    view, no copy); one indexing op picks each image's window."""
    _, c, h, w = images.shape
    b = idx.shape[0]
    padded = F.pad(images.index_select(0, idx), (pad, pad, pad, pad))
    hp, wp = h + 2 * pad, w + 2 * pad
    windows = padded.as_strided(
        (b, c, 2 * pad + 1, 2 * pad + 1, h, w), (c * hp * wp, hp * wp, wp, 1, wp, 1)
    )
    out = windows[torch.arange(b, device=images.device), :, rows[:, 0], rows[:, 1]]
    flip = rows[:, 2].bool()[:, None, None, None]
    return torch.where(flip, out.flip(3), out)


class ResidentTrainLoader:
    """The training batches of one epoch (sampler.set_epoch picks the epoch and first
    batch), as imagecheck.Batch on the device: images normalised float32, labels int64,
    and the unreadable images the batch dropped."""

    def __init__(self, rset: ResidentSet, sampler, seed: int, pad: int) -> None:
        self.rset, self.sampler, self.seed, self.pad = rset, sampler, seed, pad

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Batch]:
        rset = self.rset
        epoch = self.sampler.epoch
        batches = [[j % rset.n for j in b] for b in self.sampler]
        if not batches:
            return
        dev = rset.device
        table = augment_table(self.seed, epoch, rset.n, self.pad).to(dev)
        flat = torch.tensor([i for b in batches for i in b], dtype=torch.long)
        flat_dev = flat.to(dev)  # one copy per epoch, none per step
        start = 0
        for b in batches:
            end = start + len(b)
            idx = flat_dev[start:end]
            bad: list[BadItem] = []
            if rset.bad:
                good, bad = rset.split_bad(b)
                if bad:
                    idx = torch.tensor(good, dtype=torch.long).to(dev)
            start = end
            if idx.numel() == 0:
                yield Batch(torch.empty(0), torch.empty(0, dtype=torch.long), bad)
                continue
            x = augment(rset.images, idx, table[idx], self.pad)
            yield Batch(rset.normalise(x), rset.targets[idx], bad)


class ResidentValLoader:
    """Validation batches in order (or this rank's `indices`): normalised, no augmentation."""

    def __init__(
        self, rset: ResidentSet, batch_size: int, indices: Sequence[int] | None = None
    ) -> None:
        self.rset = rset
        self.batch_size = batch_size
        self.indices = list(range(rset.n)) if indices is None else list(indices)

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        rset = self.rset
        for start in range(0, len(self.indices), self.batch_size):
            b = self.indices[start : start + self.batch_size]
            good, bad = rset.split_bad(b) if rset.bad else (b, [])
            if not good:
                yield Batch(torch.empty(0), torch.empty(0, dtype=torch.long), bad)
                continue
            contiguous = good == list(range(good[0], good[0] + len(good)))
            if contiguous:
                x = rset.images[good[0] : good[0] + len(good)]
                y = rset.targets[good[0] : good[0] + len(good)]
            else:
                idx = torch.tensor(good, dtype=torch.long).to(rset.device)
                x, y = rset.images[idx], rset.targets[idx]
            yield Batch(rset.normalise(x), y, bad)
