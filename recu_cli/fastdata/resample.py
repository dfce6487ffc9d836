"""Crop-and-resize of a batch of images as two matrix products, with PIL's filters.

PIL resizes separably: output pixel o of an axis is a weighted sum of the input pixels
near its centre `start + (o + 0.5) * scale`, with the filter (triangle for bilinear, Keys
cubic a = -0.5 for bicubic) stretched by max(scale, 1) when shrinking (antialiasing), cut
to the pixels it may read (the crop for a crop-then-resize, the whole image for a resize)
and normalised to sum 1. Writing those weights as a matrix per image and axis turns a
batch of different crops of same-sized images into `Wy @ X @ Wx^T`: two batched matmuls
on the GPU. PIL rounds to uint8 after each pass; here the values stay float (within about
one grey level of PIL's).
"""

from __future__ import annotations

import torch

SUPPORT = {"bilinear": 1.0, "bicubic": 2.0}


def _filter(d: torch.Tensor, kind: str) -> torch.Tensor:
    x = d.abs()
    if kind == "bilinear":
        return (1.0 - x).clamp_min(0.0)
    a = -0.5  # PIL's bicubic
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def axis_weights(
    out_len: int, in_len: int, start: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor,
    hi: torch.Tensor, kind: str,
) -> torch.Tensor:  # fmt: skip
    """[B, out_len, in_len] weights: output o of image b reads input pixels in [lo, hi)
    around start + (o + 0.5) * scale (all per-image tensors [B], float)."""
    dev = start.device
    o = torch.arange(out_len, device=dev, dtype=torch.float32)
    x = torch.arange(in_len, device=dev, dtype=torch.float32)
    centre = start[:, None] + (o[None, :] + 0.5) * scale[:, None]  # [B, O]
    stretch = scale.clamp_min(1.0)[:, None, None]
    w = _filter((x[None, None, :] + 0.5 - centre[:, :, None]) / stretch, kind)
    inside = (x[None, :] >= lo[:, None]) & (x[None, :] < hi[:, None])  # [B, I]
    w = w * inside[:, None, :]
    return w / w.sum(dim=2, keepdim=True).clamp_min(1e-12)


def crop_resize(
    images: torch.Tensor, boxes: torch.Tensor, size: int, kind: str, flip: torch.Tensor | None
) -> torch.Tensor:
    """images [B, C, H, W] (any dtype, 0..255) -> float32 [B, C, size, size] in 0..255.

    boxes [B, 8] float: per axis (y then x) start, scale, lo, hi as in axis_weights;
    flip [B] bool mirrors the output horizontally."""
    _, _, h, w = images.shape
    b = boxes.float()
    wy = axis_weights(size, h, b[:, 0], b[:, 1], b[:, 2], b[:, 3], kind)
    wx = axis_weights(size, w, b[:, 4], b[:, 5], b[:, 6], b[:, 7], kind)
    if flip is not None:
        wx = torch.where(flip[:, None, None], wx.flip(1), wx)
    x = images.to(torch.float32)
    out = torch.matmul(torch.matmul(wy[:, None], x), wx[:, None].transpose(-1, -2))
    return out.clamp_(0.0, 255.0)


def crop_box(top: float, left: float, h: float, w: float, size: int) -> list[float]:
    """Box of a crop (top, left, h, w) resized to size x size, as torchvision's
    resized_crop does it (crop first: the filter reads only the crop)."""
    return [top, h / size, top, top + h, left, w / size, left, left + w]


def resize_center_box(height: int, width: int, resize: int, size: int) -> list[float]:
    """Box of Resize(shorter side = resize) then CenterCrop(size), as torchvision computes
    them: the resize reads the whole image, the crop picks output rows and columns."""
    short, long = (height, width) if height <= width else (width, height)
    new_short, new_long = resize, int(resize * long / short)
    new_h, new_w = (new_short, new_long) if height <= width else (new_long, new_short)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    sy, sx = height / new_h, width / new_w
    return [top * sy, sy, 0.0, float(height), left * sx, sx, 0.0, float(width)]
