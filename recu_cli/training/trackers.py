"""What the loop counts across an epoch besides the loss: sign flips and skipped images."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

from recu_cli.binarize.functions import sign_pos
from recu_cli.bnn import binary_layers


def weights_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class FlipTracker:
    """Sign flips of the binary weights over an epoch, split by where each weight started:
    in the tails (|W1| > Q, the dead weights) or in the core."""

    def __init__(self) -> None:
        self.start: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def snapshot(self, model: nn.Module) -> None:
        self.start = {}
        for name, layer in binary_layers(model):
            qz = layer.quantize()
            self.start[name] = (qz.w2 >= 0, qz.w1.abs() > qz.q)

    @torch.no_grad()
    def count_tensor(self, model: nn.Module) -> torch.Tensor | None:
        """[flips, n, tail_flips, tail_n] pooled over the layers (stats.flip_count_tensor),
        on the model's device: read together with the epoch's other numbers."""
        from recu_cli.stats import flip_count_tensor

        rows = []
        for name, layer in binary_layers(model):
            if name not in self.start:
                continue
            old_plus, tail = self.start[name]
            new_sign = sign_pos(layer.quantize().w2)
            rows.append(flip_count_tensor(old_plus.float() * 2 - 1, new_sign, tail))
        return torch.stack(rows).sum(dim=0) if rows else None

    @staticmethod
    def rates_from(counts: list[float] | None) -> dict[str, float]:
        """Rates of the whole model from `count_tensor` read to the host."""
        n = flips = tail_flips = tails = 0
        if counts is not None:
            flips, n, tail_flips, tails = (int(v) for v in counts)
        core = n - tails
        return {
            "flip_rate": flips / n if n else 0.0,
            "flip_rate_tail": tail_flips / tails if tails else 0.0,
            "flip_rate_core": (flips - tail_flips) / core if core else 0.0,
        }

    def rates(self, model: nn.Module) -> dict[str, float]:
        """Rates of the whole model, pooled from each layer's counts (one host read)."""
        counts = self.count_tensor(model)
        return self.rates_from(None if counts is None else counts.tolist())

    def state(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, (plus, tail) in self.start.items():
            out[f"{name}.sign"] = plus
            out[f"{name}.tail"] = tail
        return out

    def load(self, state: dict[str, torch.Tensor], device: torch.device | None = None) -> None:
        """Masks onto `device` (the model's), whatever device they were read onto."""
        names = {k.rsplit(".", 1)[0] for k in state}
        self.start = {
            n: (state[f"{n}.sign"].to(device), state[f"{n}.tail"].to(device)) for n in names
        }


class SkippedImages:
    """Unreadable training images: each named once per process, counted per epoch."""

    def __init__(self) -> None:
        self.paths: set[str] = set()
        self.epoch = 0

    def add(self, path: str) -> bool:
        """Count one skip; True when the file is new (warn about it)."""
        self.epoch += 1
        new = path not in self.paths
        self.paths.add(path)
        return new

    def state(self) -> dict[str, Any]:
        return {"paths": sorted(self.paths), "epoch": self.epoch}

    def load(self, d: dict[str, Any]) -> None:
        self.paths = set(d.get("paths", []))
        self.epoch = int(d.get("epoch", 0))
