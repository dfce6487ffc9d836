"""Finding and replacing submodules of a model: where its classifier is, and swapping a
module at a dotted name (what conversion and a new head do)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at a dotted name (model surgery)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def classifier_name(model: nn.Module) -> str:
    """Dotted name of the final classifier (timm's cfg, else the last Linear)."""
    from torch import nn

    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("classifier")
    if isinstance(name, str):
        try:
            model.get_submodule(name)
            return name
        except AttributeError:
            pass
    last = ""
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            last = n
    return last
