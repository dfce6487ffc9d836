"""Reproducible, resumable data order and augmentation.

The batch sampler draws one permutation per epoch from (seed, epoch), shards it over
ranks, and can start at any batch. Each item's augmentation is seeded from (seed, epoch,
index), so a run resumed mid-epoch sees exactly the images, crops and flips the
uninterrupted run would have seen, whatever the number of loader workers.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, Sampler


class SeededItems(Dataset):
    """Wraps a dataset; index `epoch * n + i` means item i with epoch-specific random state."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.n = len(dataset)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, j: int):
        epoch, i = divmod(int(j), self.n)
        item_seed = (self.seed * 1_000_003 + epoch * 7_919 * self.n + i) % (2**63 - 1)
        # the CPU generator alone: torch.manual_seed would also queue a CUDA seed with a
        # captured stack trace (~0.5 ms an image) and reseed a GPU's generator in-process
        py_state, cpu_state = random.getstate(), torch.get_rng_state()
        torch.default_generator.manual_seed(item_seed)
        random.seed(item_seed)
        try:
            return self.dataset[i]
        finally:
            torch.set_rng_state(cpu_state)
            random.setstate(py_state)


class EpochBatchSampler(Sampler[list[int]]):
    def __init__(
        self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        self.n = n
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def _indices(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        per_rank = self.n // self.world_size  # drop the remainder so ranks stay in step
        return perm[self.rank * per_rank : (self.rank + 1) * per_rank]

    def __len__(self) -> int:
        return (self.n // self.world_size) // self.batch_size

    def __iter__(self) -> Iterator[list[int]]:
        idx = self._indices()
        offset = self.epoch * self.n
        for b in range(self.start_batch, len(self)):
            chunk = idx[b * self.batch_size : (b + 1) * self.batch_size]
            yield [offset + i for i in chunk]
