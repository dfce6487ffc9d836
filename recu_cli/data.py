"""Datasets and loaders: ImageFolder trees, torchvision datasets by name, the built-in demo.

Transforms follow the model: timm's own transforms for ImageNet-sized inputs, and the
standard CIFAR crop(pad 4)+flip for small (<= 64 px) inputs.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision import datasets, transforms

from recu_cli.errors import RecuError
from recu_cli.idx import DEBIAN_FASHION_ROOT, idx_split
from recu_cli.spec import ModelSpec

SMALL_INPUT = 64
TORCHVISION_DATASETS = {
    "cifar10": datasets.CIFAR10,
    "cifar100": datasets.CIFAR100,
    "mnist": datasets.MNIST,
    "fashion-mnist": datasets.FashionMNIST,
    "fashion_mnist": datasets.FashionMNIST,
}
GREY_DATASETS = ("mnist", "fashion-mnist", "fashion_mnist", "demo")


@dataclass
class DataBundle:
    train: Dataset | None
    val: Dataset
    classes: list[str]
    source: str


def build_transform(spec: ModelSpec, train: bool, grey: bool = False) -> transforms.Compose:
    """Transform matched to the model's recorded input size and normalisation."""
    size = int(spec.input_size[-1])
    steps: list = []
    if grey and spec.input_size[0] == 3:
        steps.append(transforms.Grayscale(num_output_channels=3))
    if size <= SMALL_INPUT:
        steps.append(transforms.Resize(size))
        if train:
            steps += [
                transforms.RandomCrop(size, padding=size // 8),
                transforms.RandomHorizontalFlip(),
            ]
        steps += [transforms.ToTensor(), transforms.Normalize(spec.mean, spec.std)]
        return transforms.Compose(steps)
    from timm.data import create_transform

    tf = create_transform(
        input_size=tuple(spec.input_size),
        is_training=train,
        interpolation=spec.interpolation,
        mean=spec.mean,
        std=spec.std,
        crop_pct=spec.crop_pct,
    )
    return transforms.Compose(steps + [tf]) if steps else tf


def default_root() -> Path:
    return Path(os.environ.get("RECU_DATA_ROOT", Path.home() / ".cache" / "recu" / "datasets"))


def build_data(data: str, spec: ModelSpec, train: bool = True) -> DataBundle:
    """`data` is a folder with train/ and val/, a torchvision dataset name, or 'demo'."""
    key = data.lower()
    if key == "demo":
        from recu_cli.demo import DEMO_ROOT

        return _idx_bundle(DEMO_ROOT, spec, train, "demo")
    path = Path(data).expanduser()
    if path.is_dir():
        return _image_folder(path, spec, train)
    if key in TORCHVISION_DATASETS and not path.exists():
        return _torchvision(key, spec, train)
    raise RecuError(
        f"data folder not found: {data}; give a folder with train/ and val/ ImageFolder "
        f"trees, 'demo', or one of {', '.join(sorted(set(TORCHVISION_DATASETS)))}"
    )


def _image_folder(root: Path, spec: ModelSpec, train: bool) -> DataBundle:
    val_dir = next((root / n for n in ("val", "validation") if (root / n).is_dir()), None)
    if val_dir is None:
        raise RecuError(f"{root} has no val/ folder; expected {root}/val/<class>/<image> files")
    train_ds = None
    if train:
        if not (root / "train").is_dir():
            raise RecuError(
                f"{root} has no train/ folder; expected {root}/train/<class>/<image> files"
            )
        train_ds = _folder(root / "train", build_transform(spec, True))
    val_ds = _folder(val_dir, build_transform(spec, False))
    if train_ds is not None and train_ds.classes != val_ds.classes:
        raise RecuError(f"train/ and val/ of {root} have different class folders; make them match")
    return DataBundle(train_ds, val_ds, list(val_ds.classes), str(root))


def _folder(path: Path, tf: transforms.Compose) -> datasets.ImageFolder:
    from recu_cli.imagecheck import CheckedImageFolder

    try:
        ds = CheckedImageFolder(str(path), transform=tf)
    except (FileNotFoundError, RuntimeError) as e:
        raise RecuError(
            f"{path} has no class folders with images ({str(e).splitlines()[0]}); "
            "expected <class>/<image> files"
        ) from e
    return ds


def _torchvision(key: str, spec: ModelSpec, train: bool) -> DataBundle:
    cls = TORCHVISION_DATASETS[key]
    root = default_root() / key
    grey = key in GREY_DATASETS
    if cls is datasets.FashionMNIST and not root.exists() and DEBIAN_FASHION_ROOT.is_dir():
        return _idx_bundle(DEBIAN_FASHION_ROOT, spec, train, "fashion-mnist")
    try:
        val = cls(
            str(root), train=False, download=True, transform=build_transform(spec, False, grey)
        )
        tr = (
            cls(str(root), train=True, download=True, transform=build_transform(spec, True, grey))
            if train
            else None
        )
    except Exception as e:  # noqa: BLE001 - network errors come in many types
        raise RecuError(
            f"could not find or download {key} under {root} ({str(e).splitlines()[0][:120]}); "
            "when offline, put the files there (or set RECU_DATA_ROOT), or pass a folder",
            exit_code=1,
        ) from e
    return DataBundle(tr, val, list(val.classes), f"{key}:{root}")


def _idx_bundle(root: Path, spec: ModelSpec, train: bool, source: str) -> DataBundle:
    val = idx_split(root, "val", build_transform(spec, False, grey=True))
    tr = idx_split(root, "train", build_transform(spec, True, grey=True)) if train else None
    return DataBundle(tr, val, val.classes, f"{source}:{root}")


def make_loader(
    ds: Dataset,
    batch_size: int,
    workers: int,
    shuffle: bool = False,
    sampler: torch.utils.data.Sampler | None = None,
    drop_last: bool = False,
    generator: torch.Generator | None = None,
    pin_memory: bool | None = None,
    collate_fn: Any = None,
) -> torch.utils.data.DataLoader:
    """A DataLoader whose batches carry the unreadable images they dropped (imagecheck);
    pin_memory only when the batches go to a GPU (default: when one is present)."""
    from recu_cli.imagecheck import collate

    return torch.utils.data.DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        drop_last=drop_last,
        persistent_workers=workers > 0,
        generator=generator,
        collate_fn=collate if collate_fn is None else collate_fn,
    )


def calibration_images(data: DataBundle, n: int, seed: int) -> torch.Tensor:
    """n training images (seeded choice) through the validation transforms: calibration
    should see the data as the deployed model will, without augmentation."""
    train = data.train if data.train is not None else data.val
    view = copy.copy(train)
    if hasattr(view, "transform") and hasattr(data.val, "transform"):
        view.transform = data.val.transform
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randperm(len(view), generator=gen)[: min(n, len(view))].tolist()
    items = [view[i] for i in picks]
    from recu_cli.imagecheck import BadItem

    return torch.stack([it[0] for it in items if not isinstance(it, BadItem)])


def spread_inputs(
    data: str | None, spec: ModelSpec, n: int, seed: int = 0
) -> tuple[list[torch.Tensor], str]:
    """n inputs of batch 1 and where they come from: what calibrates int8 models in
    `recu bench` (its peers and --fp-layers int8).

    With data: real images from its val/ (else train/) ImageFolder through the model's eval
    transforms, spread evenly over the folder (so over its classes). Without: random normal
    inputs, which give poorer int8 ranges but the same speed.
    """
    if data is None:
        gen = torch.Generator().manual_seed(seed + 1)
        xs = [torch.randn(1, *spec.input_size, generator=gen) for _ in range(n)]
        return xs, f"{n} random inputs (no --data given; give --data DIR for real images)"
    root = Path(data).expanduser()
    split = next((root / s for s in ("val", "validation", "train") if (root / s).is_dir()), None)
    if split is None:
        raise RecuError(
            f"--data {data}: no val/ or train/ folder; give a folder with <split>/<class>/<image>"
        )
    ds = _folder(split, build_transform(spec, train=False))
    if len(ds) == 0:
        raise RecuError(f"--data {data}: {split} holds no images")
    idx = torch.linspace(0, len(ds) - 1, min(n, len(ds))).round().long().unique().tolist()
    xs = [ds[i][0].unsqueeze(0) for i in idx]
    return xs, f"{len(xs)} real images from {split} (eval transforms of the model)"
