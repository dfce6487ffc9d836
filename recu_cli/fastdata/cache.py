"""Decoded image trees on disk, so that a second run skips decoding.

One file per (tree, deterministic steps): `$RECU_CACHE/decoded/<name>.safetensors`
(default `~/.cache/recu/decoded`), a safetensors file (no pickle) holding the uint8
images, the labels, and in its metadata the tree's content key, the unreadable files and
a SHA-256 of the tensor data. The content key hashes every image's relative path, label,
size, inode, mtime and ctime: a file added, removed, replaced or edited gives another key
and the tree is decoded again (the file is overwritten, so a tree keeps one entry). A file
that cannot be read, holds other shapes or fails its SHA-256 is damaged: it is rebuilt,
never trusted. Written atomically (atomic.py). Delete the folder to clear the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from recu_cli.atomic import atomic_path
from recu_cli.fastdata.decode import Decoded

CACHE_ENV = "RECU_CACHE"
FORMAT = "recu-decoded-1"


def cache_dir() -> Path:
    base = os.environ.get(CACHE_ENV)
    return (Path(base) if base else Path.home() / ".cache" / "recu") / "decoded"


def entry_path(root: Path, steps: str) -> Path:
    """The cache file of a tree under given deterministic steps (not of its contents)."""
    name = hashlib.sha256(f"{FORMAT}\n{root.resolve()}\n{steps}".encode()).hexdigest()[:24]
    return cache_dir() / f"{name}.safetensors"


def content_key(root: Path, samples: list[tuple[str, int]], steps: str) -> str:
    """SHA-256 over what the decoded tensor depends on: the steps and every file's
    relative path, label and stat (size, inode, mtime, ctime; symlinks followed)."""
    h = hashlib.sha256(f"{FORMAT}\n{steps}\n".encode())
    for path, target in samples:
        try:
            st = os.stat(path)
            stat = f"{st.st_size} {st.st_ino} {st.st_mtime_ns} {st.st_ctime_ns}"
        except OSError as e:
            stat = f"missing {e.errno}"
        rel = os.path.relpath(path, root)
        h.update(f"{rel}\0{target}\0{stat}\n".encode())
    return h.hexdigest()


def _data_digest(images: torch.Tensor, targets: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(memoryview(images.contiguous().numpy()).cast("B"))
    h.update(memoryview(targets.contiguous().numpy()).cast("B"))
    return h.hexdigest()


def load(path: Path, key: str, shape: tuple[int, ...]) -> tuple[Decoded | None, str]:
    """(the decoded tree, "hit") when `path` holds it for `key`; else (None, why not):
    "miss", "changed" (the tree's files changed) or "damaged (...)"."""
    if not path.is_file():
        return None, "miss"
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                return None, "damaged (not a recu decoded-data file)"
            if meta.get("key") != key:
                return None, "changed"
            images = f.get_tensor("images")
            targets = f.get_tensor("targets")
        n = int(meta["n"])
        if (
            images.dtype != torch.uint8
            or tuple(images.shape) != (n, *shape)
            or targets.dtype != torch.long
            or tuple(targets.shape) != (n,)
        ):
            return None, "damaged (unexpected tensor shapes)"
        if _data_digest(images, targets) != meta.get("sha256"):
            return None, "damaged (SHA-256 mismatch)"
        bad = {int(i): (str(p), str(why)) for i, p, why in json.loads(meta["bad"])}
        if any(not 0 <= i < n for i in bad):
            return None, "damaged (bad-image index out of range)"
    except Exception as e:  # noqa: BLE001 - any failure to read means the same: rebuild
        return None, f"damaged ({type(e).__name__})"
    return Decoded(images, targets, bad), "hit"


def save(path: Path, decoded: Decoded, key: str, root: Path) -> str | None:
    """Write the entry atomically; None, or why it could not be written (then the run goes
    on without a cache: a read-only home is no reason to stop)."""
    from safetensors.torch import save_file

    meta = {
        "format": FORMAT,
        "key": key,
        "root": str(root),
        "n": str(len(decoded)),
        "bad": json.dumps([[i, p, why] for i, (p, why) in sorted(decoded.bad.items())]),
        "sha256": _data_digest(decoded.images, decoded.targets),
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            save_file(
                {"images": decoded.images.contiguous(), "targets": decoded.targets.contiguous()},
                str(tmp),
                metadata=meta,
            )
    except OSError as e:
        return f"{e.strerror or type(e).__name__}: {path.parent}"
    return None
