"""Large JPEG trees: workers read file bytes, the GPU decodes and augments.

Worker side (`JpegFiles`, wrapped in training/sampling.SeededItems like the PIL dataset):
read the file, check it as imagecheck does (empty, not an image, truncated), read its size
from the header, and draw its crop, flip and colour jitter by calling the transform
objects' own get_params in the order the PIL transform calls them: under the same
per-(seed, epoch, index) seed, the parameters are the PIL path's. A JPEG the GPU can decode
travels as its bytes; anything else (PNG, CMYK, a file with data after its end marker, or
every image when decoding stays on the CPU) is decoded by PIL in the worker, as the PIL
path decodes it, and travels as uint8 pixels.

Device side (`assemble`): decode the batch's JPEGs in one call (torchvision's nvJPEG
decode_jpeg(list, device="cuda")), crop-and-resize every image with PIL's filter
(resample.py; one matmul pair per group of same-sized images), flip, colour jitter as
torchvision's tensor ops do, normalise. A batch the batched decoder refuses is decoded
image by image, then on the CPU; an image nothing decodes is a BadItem as on every path.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from recu_cli.fastdata.plans import JpegEvalPlan, JpegTrainPlan
from recu_cli.fastdata.resample import crop_box, crop_resize, resize_center_box
from recu_cli.imagecheck import JPEG_END, BadItem, Batch, reason

N_PARAMS = 16  # box (8), flip, brightness, contrast, saturation, jitter order (4)
NO_OP = 3  # jitter step that does nothing (hue, never drawn here)


class RawItem:
    """One image as it leaves a worker: JPEG bytes or uint8 pixels [3, H, W], label,
    augmentation parameters, path."""

    __slots__ = ("payload", "jpeg", "target", "params", "path")

    def __init__(self, payload, jpeg, target, params, path) -> None:
        self.payload, self.jpeg, self.target, self.params, self.path = (
            payload, jpeg, target, params, path,
        )  # fmt: skip


class RawBatch:
    """A batch of RawItems as it crosses from a worker: every payload in one uint8 tensor
    (one shared-memory block per batch, not one per image), and the unreadable images."""

    def __init__(self, items: list[RawItem], bad: list[BadItem]) -> None:
        flat = [it.payload.reshape(-1) for it in items]
        self.blob = torch.cat(flat) if flat else torch.zeros(0, dtype=torch.uint8)
        self.offsets = [0]
        for f in flat:
            self.offsets.append(self.offsets[-1] + f.numel())
        self.shapes = [tuple(it.payload.shape) for it in items]
        self.jpeg = [it.jpeg for it in items]
        self.paths = [it.path for it in items]
        self.targets = torch.tensor([it.target for it in items], dtype=torch.long)
        self.params = torch.stack([it.params for it in items]) if items else torch.zeros(0, 16)
        self.bad = list(bad)

    def __len__(self) -> int:
        return len(self.shapes)

    def payload(self, i: int) -> torch.Tensor:
        """JPEG bytes (1-D) or pixels [3, H, W] of image i: a view into the batch's block."""
        return self.blob[self.offsets[i] : self.offsets[i + 1]].view(self.shapes[i])

    def pin_memory(self) -> RawBatch:
        """Pixels cross to the GPU asynchronously from pinned memory (bytes go to nvJPEG)."""
        if not all(self.jpeg):
            self.blob = self.blob.pin_memory()
        return self


def collate_raw(items: list[Any]) -> RawBatch:
    return RawBatch(
        [it for it in items if isinstance(it, RawItem)],
        [it for it in items if isinstance(it, BadItem)],
    )


class JpegFiles(Dataset):
    """The worker side of the GPU path over ImageFolder `samples`."""

    def __init__(
        self, samples: list[tuple[str, int]], plan: JpegTrainPlan | JpegEvalPlan, gpu_decode: bool
    ) -> None:
        self.samples = samples
        self.plan = plan
        self.gpu_decode = gpu_decode

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> RawItem | BadItem:
        path, target = self.samples[i]
        try:
            payload, jpeg, header = self._load(Path(path))
        except Exception as e:  # noqa: BLE001 - any failure names the file, as imagecheck does
            return BadItem(path, reason(Path(path), e))
        return RawItem(payload, jpeg, int(target), self._params(header), path)

    def _load(self, path: Path):
        """(payload, is JPEG bytes, the PIL image its size is read from)."""
        from PIL import Image

        data = path.read_bytes()
        im = Image.open(io.BytesIO(data))  # reads the header only
        whole = data.endswith(JPEG_END)
        if self.gpu_decode and im.format == "JPEG" and im.mode == "RGB" and whole:
            return torch.frombuffer(bytearray(data), dtype=torch.uint8), True, im
        from torchvision.transforms.functional import pil_to_tensor

        return pil_to_tensor(im.convert("RGB")), False, im  # the PIL path's decoding

    def _params(self, im) -> torch.Tensor:
        """The image's augmentation, drawn as the PIL transform draws it (same calls,
        same order, under SeededItems' seed)."""
        p = torch.zeros(N_PARAMS, dtype=torch.float64)
        p[9:12] = 1.0
        p[12:16] = NO_OP
        plan = self.plan
        w, h = im.size
        if isinstance(plan, JpegEvalPlan):
            p[0:8] = torch.tensor(resize_center_box(h, w, plan.resize, plan.size))
            return p
        top, left, ch, cw = plan.crop.get_params(im, plan.crop.scale, plan.crop.ratio)
        p[0:8] = torch.tensor(crop_box(top, left, ch, cw, plan.size))
        if plan.flip > 0:
            p[8] = float(torch.rand(1) < plan.flip)
        if plan.jitter is not None:
            j = plan.jitter
            order, b, c, s, _ = j.get_params(j.brightness, j.contrast, j.saturation, j.hue)
            p[9:12] = torch.tensor([1.0 if f is None else f for f in (b, c, s)])
            p[12:16] = order.to(torch.float64)
        return p


class Decoder:
    """JPEG bytes -> uint8 [3, H, W] on the device: nvJPEG in batches on CUDA, falling
    back image by image and then to PIL on the CPU; pixels are only moved."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def decode(self, raw: RawBatch) -> tuple[list[torch.Tensor | None], list[BadItem]]:
        from torchvision.io import ImageReadMode, decode_jpeg

        out: list[torch.Tensor | None] = [None] * len(raw)
        bad: list[BadItem] = []
        ids = [i for i, j in enumerate(raw.jpeg) if j]
        if ids:
            try:
                images = decode_jpeg(
                    [raw.payload(i) for i in ids], mode=ImageReadMode.RGB, device=self.device
                )
                for i, im in zip(ids, images, strict=True):
                    out[i] = im
            except Exception:  # noqa: BLE001 - one bad file fails the whole batch: one by one
                for i in ids:
                    out[i] = self._one(raw.payload(i), raw.paths[i], bad)
        for i, j in enumerate(raw.jpeg):
            if not j:
                out[i] = raw.payload(i).to(self.device, non_blocking=True)
        return out, bad

    def _one(self, data: torch.Tensor, path: str, bad: list[BadItem]) -> torch.Tensor | None:
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except Exception:  # noqa: BLE001 - the CPU's turn
            pass
        try:
            from PIL import Image
            from torchvision.transforms.functional import pil_to_tensor

            im = Image.open(io.BytesIO(data.numpy().tobytes())).convert("RGB")
            return pil_to_tensor(im).to(self.device)
        except Exception as e:  # noqa: BLE001 - named and skipped like any unreadable image
            bad.append(BadItem(path, reason(Path(path), e)))
            return None


def probe_gpu_decode(device: torch.device) -> str | None:
    """None when torchvision decodes a JPEG list on `device`, else why not (one phrase)."""
    if device.type != "cuda":
        return f"no GPU JPEG decoder on {device.type}"
    try:
        from PIL import Image
        from torchvision.io import ImageReadMode, decode_jpeg

        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (200, 30, 60)).save(buf, format="JPEG")
        data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
        images = decode_jpeg([data, data], mode=ImageReadMode.RGB, device=device)
        if tuple(images[0].shape) != (3, 16, 16) or images[0].device.type != "cuda":
            return f"decode_jpeg gave {tuple(images[0].shape)} on {images[0].device}"
    except Exception as e:  # noqa: BLE001 - any failure means: decode in the workers
        return f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}".rstrip(": ")
    return None


def _grey(x: torch.Tensor) -> torch.Tensor:
    """torchvision's rgb_to_grayscale of float images [B, 3, H, W] -> [B, 1, H, W]."""
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def color_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """torchvision's ColorJitter (brightness, contrast, saturation; no hue) on float images
    in [0, 1], each image with its own factors [B, 3] and step order [B, 4]."""
    f = factors.to(x.dtype)[:, :, None, None, None]  # [B, 3, 1, 1, 1]
    for step in range(order.shape[1]):
        op = order[:, step].view(-1, 1, 1, 1)
        grey = _grey(x)
        bright = (f[:, 0] * x).clamp(0.0, 1.0)
        mean = grey.mean(dim=(1, 2, 3), keepdim=True)
        contrast = (f[:, 1] * x + (1.0 - f[:, 1]) * mean).clamp(0.0, 1.0)
        saturation = (f[:, 2] * x + (1.0 - f[:, 2]) * grey).clamp(0.0, 1.0)
        x = torch.where(
            op == 0, bright, torch.where(op == 1, contrast, torch.where(op == 2, saturation, x))
        )
    return x


class Assembler:
    """RawBatch -> imagecheck.Batch of normalised float32 images on the device."""

    def __init__(
        self, plan: JpegTrainPlan | JpegEvalPlan, device: torch.device, decoder: Decoder
    ) -> None:
        self.plan = plan
        self.device = device
        self.decoder = decoder
        self.mean = torch.tensor(plan.norm.mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(plan.norm.std, device=device).view(1, -1, 1, 1)
        self.jitter = isinstance(plan, JpegTrainPlan) and plan.jitter is not None

    def __call__(self, raw: RawBatch) -> Batch:
        images, bad = self.decoder.decode(raw)
        bad = raw.bad + bad
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, im in enumerate(images):
            if im is not None:
                groups.setdefault(tuple(im.shape[1:]), []).append(i)
        if not groups:
            return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), bad)
        # the batch leaves in group order (same-sized images together), labels alike
        order = [i for members in groups.values() for i in members]
        pin = self.device.type == "cuda"
        params = raw.params[order].to(torch.float32)
        targets = raw.targets[order]
        if pin:
            params, targets = params.pin_memory(), targets.pin_memory()
        params = params.to(self.device, non_blocking=pin)
        targets = targets.to(self.device, non_blocking=pin)
        parts, start = [], 0
        for members in groups.values():
            rows = params[start : start + len(members)]
            start += len(members)
            stack = torch.stack([images[i] for i in members])
            parts.append(
                crop_resize(stack, rows[:, 0:8], self.plan.size, self.plan.interpolation,
                            rows[:, 8] > 0.5)
            )  # fmt: skip
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        out = out.div_(255.0)
        if self.jitter:
            out = color_jitter(out, params[:, 9:12], params[:, 12:16].long())
        return Batch(out.sub_(self.mean).div_(self.std), targets, bad)


class JpegLoader:
    """Batches of a DataLoader of RawBatch, assembled on the device (in a Prefetcher thread
    when `threaded`)."""

    def __init__(self, loader, assemble: Assembler, threaded: bool) -> None:
        self.loader = loader
        self.assemble = assemble
        self.threaded = threaded
        self._current = None

    def __len__(self) -> int:
        return len(self.loader)

    def close(self) -> None:
        if self._current is not None:
            self._current.close()
            self._current = None

    def __iter__(self) -> Iterator[Batch]:
        self.close()  # an epoch abandoned early (max steps, Ctrl-C) leaves a thread behind
        if not self.threaded:
            for raw in self.loader:
                yield self.assemble(raw)
            return
        from recu_cli.fastdata.prefetch import Prefetcher

        mine = self._current = Prefetcher(self.loader, self.assemble, self.assemble.device)
        try:
            yield from mine
        finally:  # closes its own thread only: a later epoch may have started another
            mine.close()
            if self._current is mine:
                self._current = None
