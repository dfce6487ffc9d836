"""Per-step training metrics kept on the device, read by the host only at sync points.

A `float(loss)` per step makes the host wait for the GPU every step (and, under DDP, an
extra all-reduce per flag). Here every step only queues device work: the loss sum, and the
first non-finite loss with its step; the loop reads them at log intervals and at the end of
an epoch, together with the Ctrl-C flag, in one all-reduce and one transfer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from recu_cli.training.distributed import DistInfo, agree, all_reduce_sum, gather_rows


@dataclass(frozen=True)
class SyncResult:
    """What one sync point learned, over all ranks."""

    stop: bool  # some rank got Ctrl-C
    save: bool  # some rank asked for a resume point (e.g. a time-based interval elapsed)
    bad_ranks: int  # ranks that saw a non-finite loss since the epoch began
    bad_step: int  # this rank's first such step (1-based in the epoch), -1 if none
    bad_loss: float  # and its loss
    last_loss: float  # this rank's loss of the latest step (nan before the first)


class StepMetrics:
    """This epoch's training-loss sum (float64, on the device) and image count (host)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        self.loss_sum = zero.clone()
        self.count = 0
        self.bad_step = torch.full((), -1, dtype=torch.int64, device=self.device)
        self.bad_loss = zero.clone()
        self.last_loss = torch.full((), float("nan"), dtype=torch.float64, device=self.device)

    @torch.no_grad()
    def add(self, loss: torch.Tensor, n: int, step: int) -> None:
        """Queue one step's loss (a mean over n images); `step` counts from 1 in the epoch.

        loss * n is added in float64, as Python's float arithmetic did before, so the
        epoch's train loss is the same number to the last bit."""
        value = loss.detach().to(torch.float64)
        self.loss_sum += value * n
        self.count += n
        first = torch.isfinite(value).logical_not_() & (self.bad_step < 0)
        self.bad_step = torch.where(first, step, self.bad_step)
        self.bad_loss = torch.where(first, value, self.bad_loss)
        self.last_loss = value

    def sync(self, stop_requested: bool, info: DistInfo, save_wanted: bool = False) -> SyncResult:
        """The loop's one host sync: flags merged into one all-reduce, read in one transfer.

        Decisions that every rank must take at the same step (stop, write a resume point,
        which is a collective) are taken here, from the flags of all ranks."""
        flags = torch.zeros(3, dtype=torch.float64, device=self.device)
        flags[0] = 1.0 if stop_requested else 0.0
        flags[1] = (self.bad_step >= 0).to(torch.float64)
        flags[2] = 1.0 if save_wanted else 0.0
        agree(flags, info)
        local = torch.stack([self.bad_step.to(torch.float64), self.bad_loss, self.last_loss])
        stop, bad, save, bad_step, bad_loss, last = torch.cat([flags, local]).tolist()
        return SyncResult(stop > 0, save > 0, int(bad), int(bad_step), bad_loss, last)

    def epoch_mean(self, info: DistInfo) -> float:
        """Mean training loss of the epoch over all ranks' images (one all-reduce)."""
        sums = [float(self.loss_sum), float(self.count)]
        loss_sum, count = all_reduce_sum(sums, info, self.device)
        return loss_sum / max(count, 1.0)

    # -------------------------------------------------------------- resume
    def state(self, info: DistInfo) -> torch.Tensor:
        """[world_size, 2] float64 (loss sum, count) of every rank, on the CPU: each rank
        resumes its own sums, so the epoch's train loss is not reduced twice."""
        row = torch.stack([self.loss_sum, torch.tensor(float(self.count), device=self.device)])
        return gather_rows(row.to(torch.float64), info).cpu()

    def load(self, saved: torch.Tensor, info: DistInfo) -> None:
        """This rank's row of `state()` (a one-row [2] tensor from older runs is rank 0's)."""
        self.reset()
        if saved.dim() == 1:
            saved = saved.view(1, 2) if info.rank == 0 else torch.zeros(1, 2, dtype=saved.dtype)
            rank = 0
        else:
            rank = info.rank
        self.loss_sum = saved[rank, 0].to(torch.float64).to(self.device)
        self.count = int(saved[rank, 1])
