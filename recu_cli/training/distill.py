"""Distillation losses: soft labels from the teacher, and a dense signal from its features.

Logits alone give a BNN one number per class and image. Matching the teacher's block
outputs as attention maps (Zagoruyko & Komodakis 2017; Real-to-Binary, Martinez et al.
2020) tells every stage what it should compute, which is what a short fine-tune needs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    """Cross-entropy against the teacher's soft labels (ReActNet's distributional loss)."""
    soft = F.softmax(teacher.float() / t, dim=1)
    return -(soft * F.log_softmax(student.float() / t, dim=1)).sum(dim=1).mean() * (t * t)


def attention_map(f: torch.Tensor) -> torch.Tensor:
    """A(F) = vec(mean_c F^2) / ||vec(mean_c F^2)||_2, one row per sample."""
    a = f.float().pow(2).mean(dim=1).flatten(1)
    return F.normalize(a, dim=1)


def attention_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Sum over matched points of the mean (over the batch) of ||A_s - A_t||_2."""
    total = student[0].new_zeros((), dtype=torch.float32)
    for s, t in zip(student, teacher, strict=True):
        total = total + (attention_map(s) - attention_map(t)).norm(dim=1).mean()
    return total


def _stage_names(model: nn.Module) -> list[str]:
    """Top-level children that hold residual blocks (layer1..layer4 of every ResNet here)."""
    from recu_cli.blocks import BiRealBasicBlock, BiRealBottleneck
    from recu_cli.bnn import BASIC_BLOCKS, BOTTLENECKS

    kinds = BASIC_BLOCKS + BOTTLENECKS + (BiRealBasicBlock, BiRealBottleneck)
    return [
        name
        for name, child in model.named_children()
        if any(isinstance(m, kinds) for m in child.modules())
    ]


def _block_names(model: nn.Module, stages: list[str]) -> list[str]:
    return [f"{s}.{n}" for s in stages for n, _ in model.get_submodule(s).named_children()]


def feature_points(student: nn.Module, teacher: nn.Module) -> list[str]:
    """Module names whose outputs are matched: every block when teacher and student have the
    same blocks (a copy of the original), else the stage outputs they share (e.g. ResNet-56
    teaching ResNet-20: same stages, different depth)."""
    s_stages, t_stages = _stage_names(student), _stage_names(teacher)
    shared = [n for n in s_stages if n in t_stages]
    s_blocks, t_blocks = _block_names(student, shared), _block_names(teacher, shared)
    if shared and s_blocks == t_blocks:
        return s_blocks
    return shared


class FeatureTap:
    """Collects the outputs of named modules during a forward pass (forward hooks)."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.names = names
        self.outputs: dict[str, torch.Tensor] = {}
        mods = dict(model.named_modules())
        self._handles = [mods[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def hook(_module: nn.Module, _args, output: torch.Tensor) -> None:
            self.outputs[name] = output

        return hook

    def clear(self) -> None:
        """Forget outputs of forwards nobody took (validation runs the hooked model too):
        a compiled step then never depends on what an earlier forward left here."""
        self.outputs = {}

    def take(self) -> list[torch.Tensor]:
        """The outputs of the last forward, in `names` order; clears them."""
        out = [self.outputs[n] for n in self.names]
        self.outputs = {}
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
