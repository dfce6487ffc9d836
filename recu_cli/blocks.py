"""Bi-Real style residual blocks: a real-valued shortcut around every binary conv.

The blocks take over the submodules (and therefore the pretrained weights and state_dict
names) of the ResNet block they replace, so a converted model keeps every key.
"""

from __future__ import annotations

import torch
from torch import nn

from recu_cli.convert_config import ACTIVATIONS
from recu_cli.prelu import PReLU


def sign_friendly_activation(kind: str, channels: int = 1) -> nn.Module:
    """An activation that keeps negative values, so the next sign() sees both signs."""
    if kind == "hardtanh":
        return nn.Hardtanh()
    if kind == "prelu":
        return PReLU(channels, init=0.25)
    if kind == "identity":
        return nn.Identity()
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {kind!r}")


def _opt(module: nn.Module | None) -> nn.Module:
    return nn.Identity() if module is None else module


class BiRealBasicBlock(nn.Module):
    """out1 = act1(bn1(conv1(x)) + shortcut(x)); out = act2(bn2(conv2(out1)) + out1)."""

    def __init__(
        self,
        conv1: nn.Module,
        bn1: nn.Module,
        conv2: nn.Module,
        bn2: nn.Module,
        downsample: nn.Module | None,
        activation: str,
        aa: nn.Module | None = None,
        se: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.conv1, self.bn1, self.conv2, self.bn2 = conv1, bn1, conv2, bn2
        self.aa = _opt(aa)
        self.se = _opt(se)
        self.downsample = downsample
        self.act1 = sign_friendly_activation(activation, bn1.num_features)
        self.act2 = sign_friendly_activation(activation, bn2.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.act1(self.aa(self.bn1(self.conv1(x))) + shortcut)
        return self.act2(self.se(self.bn2(self.conv2(out))) + out)


class BiRealBottleneck(nn.Module):
    """1x1 (full precision) -> binary 3x3 with its own shortcut -> 1x1 (full precision).

    The shortcut around a strided 3x3 is a 2x2 average pool, as in Bi-Real Net.
    """

    def __init__(
        self,
        conv1: nn.Module,
        bn1: nn.Module,
        conv2: nn.Module,
        bn2: nn.Module,
        conv3: nn.Module,
        bn3: nn.Module,
        downsample: nn.Module | None,
        activation: str,
        act3: nn.Module,
        aa: nn.Module | None = None,
        se: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.conv1, self.bn1, self.conv2, self.bn2 = conv1, bn1, conv2, bn2
        self.conv3, self.bn3 = conv3, bn3
        self.aa = _opt(aa)
        self.se = _opt(se)
        self.downsample = downsample
        self.act1 = sign_friendly_activation(activation, bn1.num_features)
        self.act2 = sign_friendly_activation(activation, bn2.num_features)
        self.act3 = act3
        stride = conv2.stride[0] if isinstance(conv2.stride, tuple) else conv2.stride
        if aa is not None and not isinstance(aa, nn.Identity):
            stride = 2  # anti-aliased blocks downsample in `aa`, after a stride-1 conv2
        self.pool = (
            nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False)
            if stride > 1
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        shortcut = x if self.downsample is None else self.downsample(x)
        h = self.act1(self.bn1(self.conv1(x)))
        h = self.act2(self.aa(self.bn2(self.conv2(h))) + self.pool(h))
        out = self.se(self.bn3(self.conv3(h)))
        return self.act3(out + shortcut)
