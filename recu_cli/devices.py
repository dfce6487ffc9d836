"""Which device to run on: the user's choice, checked, or CUDA when present."""

from __future__ import annotations

import os

import torch

from recu_cli.errors import RecuError


def pick_device(device: str | None) -> torch.device:
    """--device as given (checked), else cuda when available, else cpu."""
    if device:
        try:
            dev = torch.device(device)
        except RuntimeError as e:
            raise RecuError(f"bad --device '{device}'; use cpu, cuda or cuda:N") from e
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RecuError("--device cuda given but no CUDA GPU is available; use --device cpu")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def bind_device(device: torch.device) -> torch.device:
    """Make a CUDA device the current one (so that pinning, cuDNN and nccl open their
    context there, not on GPU 0) and give it its index; other devices pass through."""
    if device.type != "cuda":
        return device
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.set_device(device)
    return device


def default_amp_dtype(device: torch.device) -> str:
    """bf16 where it is fast: the CPU (autocast there is for testing the GPU path) and GPUs
    with compute capability >= 8.0 (Ampere on) that report bf16 support; fp16, with a grad
    scaler, on older GPUs, whose bf16 convolutions are emulated or missing."""
    if device.type != "cuda":
        return "bf16"
    major, _ = torch.cuda.get_device_capability(device)
    return "bf16" if major >= 8 and torch.cuda.is_bf16_supported() else "fp16"


def default_workers(device: torch.device, local_world_size: int = 1) -> int:
    """DataLoader workers: 2 on the CPU (the training shares those cores); on CUDA the
    CPU cores per GPU process, at most 8, as decoding JPEGs must keep a GPU fed."""
    if device.type != "cuda":
        return 2
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(8, (cores or 1) // max(1, local_world_size) - 1))


def configure_backends(device: torch.device, deterministic: bool) -> None:
    """--deterministic: deterministic algorithms everywhere (an op without one raises), cuDNN
    deterministic and not autotuned, cuBLAS with a fixed workspace; otherwise cuDNN picks
    the fastest convolution per shape on CUDA (benchmark mode)."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
