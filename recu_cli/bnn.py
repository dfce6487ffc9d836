"""A full-precision CNN made a ReCU BNN (and its deploy form), saying exactly what changed.

Rules (docs/method.md section 4): convs with groups == 1 and a kernel larger than 1x1
become ReCUConv2d, except the stem, and except what the user keeps with --keep patterns;
1x1 convs (downsample shortcuts) and the classifier stay full precision. ResNet blocks of
timm, torchvision and recu's zoo are rewritten Bi-Real style; elsewhere the activation
that feeds a binary conv is swapped for a sign-friendly one (a ReLU would make sign()
constant +1).
"""

from __future__ import annotations

import copy
import fnmatch
from dataclasses import asdict, dataclass, field
from typing import Any

import torchvision.models.resnet as tv_resnet
from timm.models import resnet as timm_resnet
from torch import nn

from recu_cli.binarize.layers import BinaryConv2d, ReCUConv2d
from recu_cli.blocks import BiRealBasicBlock, BiRealBottleneck, sign_friendly_activation
from recu_cli.convert_config import ConvertConfig
from recu_cli.errors import RecuError
from recu_cli.models.surgery import classifier_name, set_submodule
from recu_cli.models.zoo import CifarBasicBlock

BASIC_BLOCKS = (timm_resnet.BasicBlock, tv_resnet.BasicBlock, CifarBasicBlock)
BOTTLENECKS = (timm_resnet.Bottleneck, tv_resnet.Bottleneck)
NONNEG_ACTS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Mish, nn.Sigmoid)


@dataclass
class LayerDecision:
    """What conversion decided for one conv or linear layer, and why (a report row)."""

    name: str
    kind: str  # "conv" or "linear"
    shape: list[int]
    binary: bool
    reason: str
    params: int


@dataclass
class ConversionReport:
    layers: list[LayerDecision] = field(default_factory=list)
    blocks_rewritten: list[str] = field(default_factory=list)
    activations_replaced: list[dict[str, str]] = field(default_factory=list)

    @property
    def binary_params(self) -> int:
        return sum(e.params for e in self.layers if e.binary)

    def totals(self, model: nn.Module) -> dict[str, int]:
        total = sum(p.numel() for p in model.parameters())
        return {
            "layers": len(self.layers),
            "binary_layers": sum(e.binary for e in self.layers),
            "binary_params": self.binary_params,
            "full_precision_params": total - self.binary_params,
            "total_params": total,
        }

    def to_dict(self, model: nn.Module) -> dict[str, Any]:
        return {
            "layers": [asdict(e) for e in self.layers],
            "blocks_rewritten": self.blocks_rewritten,
            "activations_replaced": self.activations_replaced,
            "totals": self.totals(model),
        }


def _kernel_area(conv: nn.Conv2d) -> int:
    return int(conv.kernel_size[0] * conv.kernel_size[1])


def _first_conv_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    first = cfg.get("first_conv")
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if isinstance(first, str) and first in names:
        return first
    return names[0] if names else ""


def _decide(model: nn.Module, config: ConvertConfig) -> tuple[dict[str, str], set[str]]:
    """For every conv/linear: the reason it stays full precision ('' = binarize)."""
    stem = _first_conv_name(model)
    head = classifier_name(model)
    reasons: dict[str, str] = {}
    binary: set[str] = set()
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            reasons[name] = "classifier" if name == head else "linear layer"
        elif isinstance(m, nn.Conv2d):
            if isinstance(m, ReCUConv2d):
                raise RecuError("the model is already binarized; convert a full-precision model")
            pattern = next((p for p in config.keep if fnmatch.fnmatchcase(name, p)), None)
            if name == stem:
                reasons[name] = "stem"
            elif name == head:
                reasons[name] = "classifier"
            elif pattern is not None:
                reasons[name] = f"kept by --keep '{pattern}'"
            elif m.groups != 1:
                reasons[name] = f"grouped conv (groups={m.groups})"
            elif _kernel_area(m) == 1:
                reasons[name] = "1x1 conv"
            elif m.padding_mode != "zeros" or isinstance(m.padding, str):
                reasons[name] = "non-zero or string padding"
            else:
                reasons[name] = ""
                binary.add(name)
    return reasons, binary


def _rewrite_block(block: nn.Module, activation: str) -> nn.Module:
    get = lambda n: getattr(block, n, None)  # noqa: E731 - attribute-or-None
    if isinstance(block, BASIC_BLOCKS):
        return BiRealBasicBlock(
            block.conv1,
            block.bn1,
            block.conv2,
            block.bn2,
            get("downsample"),
            activation,
            aa=get("aa"),
            se=get("se"),
        )
    act3 = get("act3") or get("relu") or nn.ReLU(inplace=True)
    return BiRealBottleneck(
        block.conv1,
        block.bn1,
        block.conv2,
        block.bn2,
        block.conv3,
        block.bn3,
        get("downsample"),
        activation,
        act3=act3,
        aa=get("aa"),
        se=get("se"),
    )


def check_keep(model: nn.Module, patterns: tuple[str, ...] | list[str]) -> None:
    """A --keep pattern that matches no conv layer is a typo, not a choice: say so."""
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    for p in patterns:
        if not any(fnmatch.fnmatchcase(n, p) for n in convs):
            raise RecuError(
                f"--keep '{p}' matches no conv layer of the model (for example "
                f"{', '.join(convs[1:4])}); list them with `recu convert MODEL --dry-run`"
            )


def convert_model(
    model: nn.Module, config: ConvertConfig | None = None
) -> tuple[nn.Module, ConversionReport]:
    """Binarize `model` in place (latent weights = its weights); returns it and a report."""
    config = config or ConvertConfig()
    reasons, binary = _decide(model, config)
    report = ConversionReport()

    if config.bireal:
        for name, block in list(model.named_modules()):
            if not isinstance(block, BASIC_BLOCKS + BOTTLENECKS):
                continue
            inner = {f"{name}.conv1", f"{name}.conv2", f"{name}.conv3"}
            if inner & binary:
                set_submodule(model, name, _rewrite_block(block, config.activation))
                report.blocks_rewritten.append(name)

    in_bireal = tuple(f"{b}." for b in report.blocks_rewritten)
    order = [(n, m) for n, m in model.named_modules()]
    for idx, (name, _) in enumerate(order):
        if name not in binary:
            continue
        if name.startswith(in_bireal) and not name.endswith(".conv1"):
            continue  # inside a Bi-Real block the feeding activation is already sign-friendly
        _replace_feeding_activation(model, order, idx, config, report)

    for name in sorted(binary):
        conv = model.get_submodule(name)
        layer = ReCUConv2d.from_conv(conv, alpha_init=config.alpha_init, **config.layer_kwargs())
        set_submodule(model, name, layer)

    for name, m in model.named_modules():
        if name in reasons:
            w = m.weight
            report.layers.append(
                LayerDecision(
                    name=name,
                    kind="linear" if isinstance(m, nn.Linear) else "conv",
                    shape=list(w.shape),
                    binary=name in binary,
                    reason=reasons[name] or "binarized (ReCU)",
                    params=w.numel(),
                )
            )
    return model, report


def _replace_feeding_activation(
    model: nn.Module,
    order: list[tuple[str, nn.Module]],
    idx: int,
    config: ConvertConfig,
    report: ConversionReport,
) -> None:
    """Swap the nearest activation defined before a binary conv, if it is non-negative.

    Module definition order is a heuristic for data flow; it is exact for sequential
    stacks, timm's Conv-BN-Act and norm-act layers, and ResNet stems. The report lists
    every swap so a wrong guess is visible.
    """
    for j in range(idx - 1, -1, -1):
        name, m = order[j]
        if isinstance(m, (nn.Hardtanh, nn.PReLU, nn.Tanh)):
            return  # already sign-friendly (a Bi-Real block or an earlier swap)
        if isinstance(m, NONNEG_ACTS):
            current = model.get_submodule(name)
            if not isinstance(current, NONNEG_ACTS):
                return
            set_submodule(model, name, sign_friendly_activation(config.activation, 1))
            report.activations_replaced.append(
                {"name": name, "was": type(m).__name__, "now": config.activation}
            )
            return
        if isinstance(m, nn.Conv2d) and j < idx - 1:
            # another conv in between: the activation does not feed this conv directly,
            # unless it is the conv's own norm-act pair; stop looking.
            return


def to_deploy(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace every ReCUConv2d by its deploy form (ready +-1 weights), eval mode."""
    if not inplace:
        model = copy.deepcopy(model)
    for name, m in list(model.named_modules()):
        if isinstance(m, ReCUConv2d):
            set_submodule(model, name, BinaryConv2d.from_recu(m))
    return model.eval()


def binary_layers(model: nn.Module) -> list[tuple[str, ReCUConv2d]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ReCUConv2d)]


def set_tau(model: nn.Module, tau: float) -> None:
    for _, m in binary_layers(model):
        m.set_tau(tau)
