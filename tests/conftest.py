"""Shared fixtures: the real data in ../shared/data, skipped (or failed in CI) when absent."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# decoded-data caches of the test trees (recu_cli/fastdata/cache.py) stay out of ~/.cache;
# set here, at import, so that the CLI's child processes inherit it
os.environ.setdefault("RECU_CACHE", tempfile.mkdtemp(prefix="recu-test-cache-"))
SHARED_DATA = Path(os.environ.get("RECU_SHARED_DATA", REPO.parent / "shared" / "data"))
CIFAR = SHARED_DATA / "cifar10"
RESNET20_WEIGHTS = SHARED_DATA / "weights" / "resnet20-12fca82f.th"


# CI (.ci/run) sets RECU_REQUIRE_SHARED=1: it has ../shared/data and installs
# `.[dev,export,peers]` and a C++ toolchain, so there a test that would skip for want of
# any of them fails instead; only what CI cannot have may skip.
IN_CI = os.environ.get("RECU_REQUIRE_SHARED") == "1"


def absent(what: str) -> None:
    """Skip for want of `what`, naming it; fail in CI, which provides everything. Called at
    a module's top, it skips (or fails) the whole module."""
    if IN_CI:
        pytest.fail(f"{what}, and RECU_REQUIRE_SHARED=1 (CI) requires it", pytrace=False)
    pytest.skip(what, allow_module_level=True)


def require_shared(path: Path) -> Path:
    """Skip with a reason where ../shared/data is absent; fail when RECU_REQUIRE_SHARED=1."""
    if not path.exists():
        absent(f"{path} is absent (the real test data lives in ../shared/data beside the repo)")
    return path


def require_module(name: str, extra: str):
    """The module, imported; else a skip naming the pip command (a failure in CI). Only an
    ImportError means absent: any other error raised by the import (a broken install)
    fails the test."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as e:
        absent(f'{name} cannot be imported ({e}): pip install -e ".[{extra}]"')


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
