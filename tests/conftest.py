"""Shared fixtures: the real data in ../shared/data, skipped (or failed in CI) when absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RECU_SHARED_DATA", REPO.parent / "shared" / "data"))
CIFAR = SHARED_DATA / "cifar10"
RESNET20_WEIGHTS = SHARED_DATA / "weights" / "resnet20-12fca82f.th"


def require_shared(path: Path) -> Path:
    """Skip with a reason where ../shared/data is absent; fail when RECU_REQUIRE_SHARED=1."""
    if path.exists():
        return path
    msg = f"{path} is absent (the real test data lives in ../shared/data beside the repo)"
    if os.environ.get("RECU_REQUIRE_SHARED") == "1":
        pytest.fail(msg + " and RECU_REQUIRE_SHARED=1 requires it")
    pytest.skip(msg)


def link_tree(dst: Path, per_split: dict[str, int]) -> Path:
    """An ImageFolder tree of real CIFAR-10 JPEGs (symlinks, nothing copied)."""
    require_shared(CIFAR)
    for split, n in per_split.items():
        for cls_dir in sorted((CIFAR / split).iterdir()):
            d = dst / split / cls_dir.name
            d.mkdir(parents=True)
            for img in sorted(cls_dir.iterdir())[:n]:
                (d / img.name).symlink_to(img)
    return dst


@pytest.fixture
def cifar_dir() -> Path:
    return require_shared(CIFAR)


@pytest.fixture
def resnet20_weights() -> Path:
    return require_shared(RESNET20_WEIGHTS)


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(min(2, os.cpu_count() or 1))


def cifar_batch(n: int = 64, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """n real CIFAR-10 val images (balanced over classes), normalised like the zoo models."""
    from torchvision import datasets, transforms

    from recu_cli.spec import IMAGENET_MEAN, IMAGENET_STD

    require_shared(CIFAR)
    tf = transforms.Compose(
        [
            transforms.Resize(size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    ds = datasets.ImageFolder(str(CIFAR / "val"), transform=tf)
    per_class = max(1, n // len(ds.classes))
    idx = [c * 500 + i for c in range(len(ds.classes)) for i in range(per_class)][:n]
    xs, ys = zip(*(ds[i] for i in idx), strict=True)
    return torch.stack(xs), torch.tensor(ys)
