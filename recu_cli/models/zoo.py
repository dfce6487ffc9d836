"""recu's own CIFAR models, registered in timm's registry so `timm.create_model` builds them.

ResNet-18 (CIFAR) is timm's ResNet-18 with a 3x3 stride-1 stem and no max-pool.
ResNet-20/32/44/56 are He et al.'s CIFAR ResNets with the parameter-free "option A"
shortcut; their state_dict keys match the widely used pretrained files
(conv1, bn1, layerK.I.conv1/bn1/conv2/bn2, linear). VGG-small is the network of the ReCU
and LQ-Nets papers (128-128-256-256-512-512 channels, three max-pools, one linear).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from recu_cli.spec import IMAGENET_MEAN, IMAGENET_STD


class OptionAShortcut(nn.Module):
    """Subsample by 2 and zero-pad channels by planes/4 on each side (no parameters)."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class CifarBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.act2 = nn.ReLU(inplace=True)
        if stride != 1 or in_planes != planes:
            self.downsample: nn.Module | None = OptionAShortcut(planes // 4)
        else:
            self.downsample = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + shortcut)


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10, in_chans: int = 3, **_: object) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError("CIFAR ResNet depth must be 6n + 2")
        n = (depth - 2) // 6
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.act1 = nn.ReLU(inplace=True)
        in_planes = 16
        for i, planes in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(CifarBasicBlock(in_planes, planes, stride))
                in_planes = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_features = 64
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def get_classifier(self) -> nn.Module:
        return self.linear

    def reset_classifier(self, num_classes: int, **_: object) -> None:
        self.num_classes = num_classes
        self.linear = nn.Linear(self.num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.linear(x)


class VGGSmall(nn.Module):
    """conv128-conv128-pool-conv256-conv256-pool-conv512-conv512-pool-fc (BN + ReLU)."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, **_: object) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_chans
        for i, c_out in enumerate((128, 128, 256, 256, 512, 512)):
            layers += [nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out)]
            if i % 2 == 1:
                layers.append(nn.MaxPool2d(2))
            layers.append(nn.ReLU(inplace=True))
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.num_classes = num_classes
        self.num_features = 512 * 4 * 4
        self.fc = nn.Linear(self.num_features, num_classes)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, **_: object) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.fc(self.features(x).flatten(1))


def _resnet18_cifar(num_classes: int = 10, in_chans: int = 3, **kwargs) -> nn.Module:
    """timm's ResNet-18 with the CIFAR stem (3x3 stride-1 conv, no max-pool)."""
    from timm.models.resnet import BasicBlock, ResNet

    model = ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, in_chans=in_chans, **kwargs)
    model.conv1 = nn.Conv2d(in_chans, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


def _cfg(classifier: str, first_conv: str = "conv1") -> dict:
    return {
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "pool_size": None,
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        # ImageNet's statistics, not CIFAR's: what the widely used pretrained CIFAR ResNet
        # files (and recu's demo weights) were trained with
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "first_conv": first_conv,
        "classifier": classifier,
        "license": "bsd-2-clause",
    }


default_cfgs = generate_default_cfgs(
    {
        **{f"resnet{d}.cifar10": _cfg("linear") for d in (20, 32, 44, 56)},
        "vgg_small.cifar10": _cfg("fc", first_conv="features.0"),
        "resnet18_cifar.cifar10": _cfg("fc"),
    }
)


def _resnet(depth: int, pretrained: bool, **kwargs) -> CifarResNet:
    return build_model_with_cfg(
        lambda **kw: CifarResNet(depth, **kw), f"resnet{depth}", pretrained, **kwargs
    )


@register_model
def resnet20(pretrained: bool = False, **kwargs) -> CifarResNet:
    """CIFAR ResNet-20 (option-A shortcuts, 0.27 M params)."""
    return _resnet(20, pretrained, **kwargs)


@register_model
def resnet32(pretrained: bool = False, **kwargs) -> CifarResNet:
    """CIFAR ResNet-32 (option-A shortcuts)."""
    return _resnet(32, pretrained, **kwargs)


@register_model
def resnet44(pretrained: bool = False, **kwargs) -> CifarResNet:
    """CIFAR ResNet-44 (option-A shortcuts)."""
    return _resnet(44, pretrained, **kwargs)


@register_model
def resnet56(pretrained: bool = False, **kwargs) -> CifarResNet:
    """CIFAR ResNet-56 (option-A shortcuts, 0.85 M params)."""
    return _resnet(56, pretrained, **kwargs)


@register_model
def vgg_small(pretrained: bool = False, **kwargs) -> VGGSmall:
    """VGG-small of the ReCU/LQ-Nets papers for 32x32 inputs."""
    return build_model_with_cfg(VGGSmall, "vgg_small", pretrained, **kwargs)


@register_model
def resnet18_cifar(pretrained: bool = False, **kwargs) -> nn.Module:
    """ResNet-18 for 32x32 inputs (the ReCU paper's CIFAR ResNet-18)."""
    return build_model_with_cfg(_resnet18_cifar, "resnet18_cifar", pretrained, **kwargs)


RECU_MODELS = ("resnet20", "resnet32", "resnet44", "resnet56", "vgg_small", "resnet18_cifar")
