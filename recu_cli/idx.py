"""Fashion-MNIST/MNIST in their original IDX (gzip) files: the Debian package's layout and
recu's built-in demo subset. Parsed with numpy, no pickle."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from recu_cli.errors import RecuError

FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
DEBIAN_FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped) as a uint8 array of its recorded shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise RecuError(f"cannot read {path} ({e}); the IDX file is damaged") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise RecuError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise RecuError(f"{path} is truncated: {body.size} bytes for shape {dims}")
    return body.reshape(dims)


class IdxImages(Dataset):
    """28x28 grey images and labels from a pair of IDX files."""

    def __init__(self, images: Path, labels: Path, classes: list[str], transform=None) -> None:
        self.images = read_idx(images)
        self.targets = torch.from_numpy(read_idx(labels).astype(np.int64))
        if len(self.images) != len(self.targets):
            raise RecuError(f"{images} and {labels} hold different numbers of items")
        self.classes = classes
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        img = Image.fromarray(self.images[i], mode="L")
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.targets[i])


def idx_split(root: Path, split: str, transform=None) -> IdxImages:
    prefix = "train" if split == "train" else "t10k"
    images = _find(root, f"{prefix}-images-idx3-ubyte")
    labels = _find(root, f"{prefix}-labels-idx1-ubyte")
    return IdxImages(images, labels, FASHION_CLASSES, transform)


def _find(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise RecuError(f"{root} lacks {stem}(.gz); expected the Fashion-MNIST IDX files there")
