"""Each module's class, per-sample output shape and MACs, from one forward of the module
tree on the meta device (shapes only, no compute).

What `recu info` prints per module: computed when a packed file is written (its metadata
'modules', docs/format.md section 4.2), and for older files from the tree rebuilt on
reading. Conventions: 1 MAC per multiply-add of a conv or linear layer (a binary conv's
MACs are its BOPs); BN, activations and the alpha scaling are not counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ModuleFacts:
    """One module of the tree: its class name, per-sample output shape and MACs (None
    where not a conv/linear or where the meta forward failed)."""

    type: str
    output: tuple[int, ...] | None
    macs: int | None


def module_facts(model: nn.Module, input_size: tuple[int, ...]) -> dict[str, ModuleFacts]:
    """Facts of every module, in `named_modules` order."""
    outputs = _output_shapes(model, input_size)
    return {
        name: ModuleFacts(type(m).__name__, outputs.get(name), _macs(m, outputs.get(name)))
        for name, m in model.named_modules()
    }


def _output_shapes(model: nn.Module, input_size: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Per-sample output shape of every conv and linear at `input_size` (meta forward)."""
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            hooks.append(
                m.register_forward_hook(
                    lambda _m, _i, out, name=name: shapes.__setitem__(name, tuple(out.shape[1:]))
                )
            )
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_size, device="meta"))
    except Exception:  # noqa: BLE001 - an exotic forward on meta: report compute as n/a
        shapes.clear()
    finally:
        for h in hooks:
            h.remove()
    return shapes


def _macs(m: nn.Module, out: tuple[int, ...] | None) -> int | None:
    if out is None:
        return None
    if isinstance(m, nn.Conv2d):
        kh, kw = m.kernel_size
        return math.prod(out) * (m.in_channels // m.groups) * kh * kw
    if isinstance(m, nn.Linear):
        return math.prod(out) * m.in_features
    return None
