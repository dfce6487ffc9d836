"""torchrun awareness: one process per device, rank 0 writes, metrics reduced over ranks."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistInfo:
    """Start the process group when launched by torchrun (nccl on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        # before the process group: nccl's communicator, and any CUDA context opened on
        # the way, must live on this rank's GPU, not on GPU 0
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        if device_type == "cuda":
            dist.init_process_group(backend="nccl", device_id=torch.device("cuda", local))
        else:
            dist.init_process_group(backend="gloo")
    return DistInfo(rank, world, local)


def all_reduce_sum(values: list[float], info: DistInfo, device: torch.device) -> list[float]:
    if not info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def agree(flags: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a small device tensor of flags over ranks in place (one all-reduce, no host read:
    the caller reads it together with whatever else it needs, in one transfer)."""
    if info.enabled:
        dist.all_reduce(flags, op=dist.ReduceOp.SUM)
    return flags


def gather_rows(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """[world_size, *t.shape]: every rank's t, in rank order, on every rank."""
    if not info.enabled:
        return t.unsqueeze(0)
    rows = [torch.empty_like(t) for _ in range(info.world_size)]
    dist.all_gather(rows, t.contiguous())
    return torch.stack(rows)


def broadcast_object(obj, info: DistInfo):
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


@torch.no_grad()
def sync_buffers(model: torch.nn.Module, info: DistInfo) -> None:
    """Average float buffers (BN running stats) over ranks; copy integer ones from rank 0.

    DDP only broadcasts buffers at the start of each forward, so after the last step every
    rank holds its own statistics; this makes the saved model the same on all ranks."""
    if not info.enabled:
        return
    for buf in model.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            buf.div_(info.world_size)
        else:
            dist.broadcast(buf, src=0)
