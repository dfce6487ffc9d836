"""Which data path a run takes (--data-path), the loaders it needs, and the line saying why.

`auto` takes the first that applies: `resident` when the model's inputs are small (the
crop-and-flip transform), the decoded training and validation sets fit the device's
budget (a quarter of its memory) and all images decode to one shape; `gpu-decode` on CUDA
for ImageFolder trees under timm's transforms; otherwise `pil`. A path given by name must
apply (else one error line saying why). The choice is stored in config.json, so --resume
continues on the path the run started with.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from recu_cli.data import SMALL_INPUT
from recu_cli.errors import RecuError
from recu_cli.fastdata import cache
from recu_cli.fastdata.decode import Decoded, ShapeMismatch, decode
from recu_cli.fastdata.plans import (
    SmallPlan,
    Unsupported,
    jpeg_eval_plan,
    jpeg_train_plan,
    small_plan,
)

Log = Callable[..., None]
MAKE_LOADER = Callable[[Dataset, Callable], Any]  # (dataset, collate_fn) -> DataLoader


class NotHere(Exception):
    """This path does not apply to this run (the message says why)."""


@dataclass
class DataPathChoice:
    path: str  # resident | gpu-decode | pil
    why: str
    line: str  # "data: ..." as printed first and logged

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "why": self.why, "line": self.line}


@dataclass
class FastLoaders:
    choice: DataPathChoice
    train: Any = None  # None: the PIL loaders
    val: Any = None


def resident_budget(device: torch.device) -> int:
    """Bytes the decoded sets may take: a quarter of the device's memory (of the free
    memory's half on a GPU, whichever is less)."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(min(free // 2, total // 4))
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024 // 4
    except (OSError, KeyError, ValueError):
        return 2 << 30


def choose(
    requested: str,
    device: torch.device,
    data: Any,
    spec: Any,
    seed: int,
    sampler: Any,
    val_batch: int,
    val_indices: list[int] | None,
    workers: int,
    train_loader: MAKE_LOADER,
    val_loader: MAKE_LOADER,
    log: Log,
) -> FastLoaders:
    """The loaders of the requested path (`auto`: the first that applies)."""
    if requested == "pil":
        return FastLoaders(_pil_choice("--data-path pil", workers))
    reasons: list[str] = []
    if requested in ("auto", "resident"):
        try:
            return _resident(device, data, spec, seed, sampler, val_batch, val_indices, workers,
                             log)  # fmt: skip
        except NotHere as e:
            if requested == "resident":
                raise RecuError(f"--data-path resident: {e}; use --data-path auto or pil") from e
            reasons.append(f"not resident: {e}")
    if requested == "gpu-decode" or (requested == "auto" and device.type == "cuda"):
        try:
            return _gpu_decode(device, data, workers, train_loader, val_loader, log)
        except NotHere as e:
            if requested == "gpu-decode":
                raise RecuError(f"--data-path gpu-decode: {e}; use --data-path auto or pil") from e
            reasons.append(f"no GPU decoding: {e}")
    elif requested == "auto":
        reasons.append("gpu-decode is for CUDA devices")
    return FastLoaders(_pil_choice("; ".join(reasons), workers))


def _pil_choice(why: str, workers: int) -> DataPathChoice:
    who = f"{workers} loader workers" if workers else "the main process"
    return DataPathChoice("pil", why, f"data: pil: {who} decode and augment with PIL ({why})")


def _what(ds: Dataset) -> str:
    if getattr(ds, "samples", None) is not None:
        return "image tree"
    return f"{type(ds).__name__} (in memory)"


def _resident(
    device: torch.device, data: Any, spec: Any, seed: int, sampler: Any, val_batch: int,
    val_indices: list[int] | None, workers: int, log: Log,
) -> FastLoaders:  # fmt: skip
    from recu_cli.fastdata.resident import ResidentSet, ResidentTrainLoader, ResidentValLoader

    size = int(spec.input_size[-1])
    if size > SMALL_INPUT:
        raise NotHere(f"{size} px inputs (it takes inputs of up to {SMALL_INPUT} px)")
    if not hasattr(data.train, "transform") or not hasattr(data.val, "transform"):
        raise NotHere(f"{type(data.train).__name__} has no transform to read")
    try:
        train_plan = small_plan(data.train.transform, train=True)
        val_plan = small_plan(data.val.transform, train=False)
    except Unsupported as e:
        raise NotHere(str(e)) from e
    shape = (int(spec.input_size[0]), train_plan.size, train_plan.size)
    n_train, n_val = len(data.train), len(data.val)
    need = (n_train + n_val) * math.prod(shape)
    budget = resident_budget(device)
    if need > budget:
        raise NotHere(f"{need / 1e6:,.0f} MB decoded, more than its budget of "
                      f"{budget / 1e6:,.0f} MB on {device}")  # fmt: skip
    start = time.perf_counter()
    try:
        train, train_note = _decoded(data.train, train_plan, shape, workers, log)
        val, val_note = _decoded(data.val, val_plan, shape, workers, log)
    except ShapeMismatch as e:
        raise NotHere(str(e)) from e
    mean, std = train_plan.norm.mean, train_plan.norm.std
    train_set = ResidentSet(train, device, mean, std)
    val_set = ResidentSet(val, device, val_plan.norm.mean, val_plan.norm.std)
    notes = train_note if train_note == val_note else f"train {train_note}, val {val_note}"
    seconds = time.perf_counter() - start
    line = (
        f"data: resident: {_what(data.train)} on {device} ({n_train:,} + {n_val:,} validation "
        f"images, {(train_set.nbytes + val_set.nbytes) / 1e6:,.0f} MB uint8, {notes}, "
        f"{seconds:.1f} s); crops, flips and normalisation there"
    )
    why = f"{shape[1]} px inputs, {need / 1e6:,.0f} MB decoded within {device}'s budget"
    return FastLoaders(
        DataPathChoice("resident", why, line),
        ResidentTrainLoader(train_set, sampler, seed, train_plan.pad),
        ResidentValLoader(val_set, val_batch, val_indices),
    )


def _decoded(
    ds: Dataset, plan: SmallPlan, shape: tuple[int, int, int], workers: int, log: Log
) -> tuple[Decoded, str]:
    """The decoded set, from the cache when the tree is unchanged; and what happened."""
    samples = getattr(ds, "samples", None)
    root = getattr(ds, "root", None)
    if samples is None or root is None:
        return decode(ds, plan.prefix, shape, workers=0), "decoded in memory"
    root = Path(root)
    steps = f"{plan.prefix_repr()} -> uint8 {shape}"
    path = cache.entry_path(root, steps)
    key = cache.content_key(root, samples, steps)
    found, status = cache.load(path, key, shape)
    if found is not None:
        return found, "cache hit"
    if status.startswith("damaged"):
        log(f"note: the decoded-data cache {path} is {status}: decoding again")
    decoded = decode(ds, plan.prefix, shape, workers)
    failed = cache.save(path, decoded, key, root)
    if failed:
        log(f"note: could not write the decoded-data cache ({failed}); set RECU_CACHE")
        return decoded, "decoded, not cached"
    what = {"miss": "decoded and cached", "changed": "tree changed: decoded and cached"}
    return decoded, what.get(status, "decoded again and cached")


def _gpu_decode(
    device: torch.device, data: Any, workers: int, train_loader: MAKE_LOADER,
    val_loader: MAKE_LOADER, log: Log,
) -> FastLoaders:  # fmt: skip
    from recu_cli.fastdata.jpeg import (
        Assembler,
        Decoder,
        JpegFiles,
        JpegLoader,
        collate_raw,
        probe_gpu_decode,
    )  # fmt: skip

    if getattr(data.train, "samples", None) is None or getattr(data.val, "samples", None) is None:
        raise NotHere(f"{type(data.train).__name__} is not an image tree")
    try:
        train_plan = jpeg_train_plan(data.train.transform)
        val_plan = jpeg_eval_plan(data.val.transform)
    except Unsupported as e:
        raise NotHere(str(e)) from e
    why_not = probe_gpu_decode(device)
    on_gpu = why_not is None
    if device.type == "cuda" and not on_gpu:
        log(f"note: GPU JPEG decoding failed ({why_not}); the loader workers decode instead")
    decoder = Decoder(device)
    threaded = device.type == "cuda"
    train = JpegLoader(
        train_loader(JpegFiles(data.train.samples, train_plan, on_gpu), collate_raw),
        Assembler(train_plan, device, decoder),
        threaded,
    )
    val = JpegLoader(
        val_loader(JpegFiles(data.val.samples, val_plan, on_gpu), collate_raw),
        Assembler(val_plan, device, decoder),
        threaded,
    )
    who = f"{workers} loader workers" if workers else "the main process"
    if on_gpu:
        how = f"JPEGs decoded on {device} (nvJPEG); {who} read the files"
    else:
        how = f"{who} decode with PIL ({why_not})"
    line = (
        f"data: gpu-decode: image tree ({len(data.train):,} + {len(data.val):,} validation "
        f"images); {how}; crops ({train_plan.interpolation}), flips, colour jitter and "
        f"normalisation on {device}"
    )
    return FastLoaders(DataPathChoice("gpu-decode", "an image tree under timm's transforms", line),
                       train, val)  # fmt: skip
