"""1 bit per binary weight: the encoding of `<layer>.weight_bits` (docs/format.md section 3)."""

from __future__ import annotations

import math

import numpy as np
import torch


def pack_signs(sign: torch.Tensor) -> torch.Tensor:
    """+-1 weights [O, I, kh, kw] -> U8 [O, ceil(I*kh*kw / 8)]: 1 = +1, MSB first, pad 0."""
    bits = (sign.detach() >= 0).reshape(sign.shape[0], -1).cpu().numpy().astype(np.uint8)
    return torch.from_numpy(np.packbits(bits, axis=1, bitorder="big"))


def unpack_signs(packed: torch.Tensor, shape: tuple[int, ...] | list[int]) -> torch.Tensor:
    """Inverse of `pack_signs`: U8 rows -> float32 +-1 of `shape`; padding bits must be 0."""
    per_row = math.prod(shape[1:])
    arr = packed.cpu().numpy()
    if per_row % 8:
        spare = (1 << (8 - per_row % 8)) - 1
        if np.any(arr[:, -1] & spare):
            raise ValueError("padding bits are not zero")
    bits = np.unpackbits(arr, axis=1, count=per_row, bitorder="big")
    return torch.from_numpy(bits).reshape(tuple(shape)).float().mul_(2.0).sub_(1.0)
