"""Conversion of real model families: what becomes binary, and the pretrained weights stay."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from recu_cli.binarize import BinaryConv2d, ReCUConv2d
from recu_cli.blocks import BiRealBasicBlock, BiRealBottleneck
from recu_cli.bnn import binary_layers, convert_model, set_tau, to_deploy
from recu_cli.convert_config import ConvertConfig
from recu_cli.errors import RecuError
from recu_cli.models import create_model
from recu_cli.stats import dead_weight_share


def _binary_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, ReCUConv2d)]


def _run(model: nn.Module, size: int) -> None:
    model.train()
    x = torch.randn(2, 3, size, size)
    out = model(x)
    out.sum().backward()
    grads = [m.weight.grad for m in model.modules() if isinstance(m, ReCUConv2d)]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", ["resnet18", "tv:resnet18"])
def test_resnet18_has_exactly_its_16_block_convs_binary(name: str) -> None:
    model, _ = create_model(name)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    model, report = convert_model(model)
    names = _binary_names(model)
    expected = [f"layer{i}.{b}.conv{c}" for i in range(1, 5) for b in range(2) for c in (1, 2)]
    assert sorted(names) == sorted(expected)
    assert [e.name for e in report.layers if e.binary] == expected
    reasons = {e.name: e.reason for e in report.layers}
    assert reasons["conv1"] == "stem"
    assert reasons["layer2.0.downsample.0"] == "1x1 conv"
    assert reasons["fc"] == "classifier"
    assert report.binary_params == 10_985_472
    assert all(
        isinstance(model.get_submodule(f"layer{i}.{b}"), BiRealBasicBlock)
        for i in range(1, 5)
        for b in range(2)
    )
    # every pretrained tensor is still there, under its own name, unchanged
    state = model.state_dict()
    for k, v in original.items():
        assert torch.equal(state[k], v), k
    # the ReLU that fed layer1.0.conv1 is gone
    assert report.activations_replaced and report.activations_replaced[0]["was"] == "ReLU"
    _run(model, 64)


def test_timm_resnet50_bottlenecks() -> None:
    model, _ = create_model("resnet50")
    for m in model.modules():  # timm zero-inits the last BN of each block; pretrained ones are not
        if isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
    model, report = convert_model(model)
    names = _binary_names(model)
    assert len(names) == 16 and all(n.endswith("conv2") for n in names)
    assert isinstance(model.layer2[0], BiRealBottleneck)
    assert isinstance(model.layer2[0].pool, nn.AvgPool2d)  # shortcut around the strided 3x3
    _run(model, 64)


def test_resnet20_cifar(resnet20_weights) -> None:
    model, _ = create_model("resnet20", weights=resnet20_weights)
    model, report = convert_model(model)
    assert len(_binary_names(model)) == 18
    assert len(report.blocks_rewritten) == 9
    _run(model, 32)


def test_non_resnet_family_uses_generic_rule() -> None:
    model, _ = create_model("densenet121")
    model, report = convert_model(model)
    binary = [e for e in report.layers if e.binary]
    assert binary and all(e.shape[2] == 3 for e in binary)  # only the 3x3 convs
    assert not report.blocks_rewritten
    # every binary conv's feeding ReLU (inside the norm-act layer) was swapped
    assert len(report.activations_replaced) == len(binary)
    assert all(
        isinstance(model.get_submodule(a["name"]), nn.Hardtanh) for a in report.activations_replaced
    )
    _run(model, 64)


def test_keep_pattern_and_untouched_block() -> None:
    model, _ = create_model("resnet18")
    model, report = convert_model(model, ConvertConfig(keep=("layer4.*",)))
    names = _binary_names(model)
    assert len(names) == 12 and not any(n.startswith("layer4") for n in names)
    kept = {e.name: e.reason for e in report.layers}["layer4.0.conv1"]
    assert kept == "kept by --keep 'layer4.*'"
    assert not isinstance(model.layer4[0], BiRealBasicBlock)  # fully kept block stays as it was


def test_options_reach_the_layers_and_deploy_matches() -> None:
    model, _ = create_model("resnet20")
    cfg = ConvertConfig(
        b_star=1.0, tau=0.9, alpha_init="random", alpha_mode="learned", activation="prelu"
    )
    model, _ = convert_model(model, cfg)
    layer = model.layer1[0].conv1
    assert layer.b_star == 1.0 and layer.tau.item() == pytest.approx(0.9)
    assert isinstance(model.layer1[0].act1, nn.PReLU)
    model.eval()
    deploy = to_deploy(model)
    assert isinstance(deploy.layer1[0].conv1, BinaryConv2d)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(deploy(x), model(x))


def test_dead_weight_share_follows_tau() -> None:
    """The share of |W1| > Q(tau) is what the distribution of W1 says: 2 (1 - tau) for
    Laplace weights (recu-method.md section 2), erfc(Q / (sigma sqrt 2)) for Gaussian ones
    (Q / sigma = -ln(2 - 2 tau) sqrt(2 / pi), since b_hat = E|W1| = sigma sqrt(2 / pi)).
    Tolerance 0.004: 267,264 weights (binomial sd 0.0009) standardized per filter of 144 to
    576 (measured off by at most 0.0011 over three seeds)."""
    torch.manual_seed(0)
    model, _ = create_model("resnet20")  # random init: Gaussian (Kaiming normal) weights
    model, _ = convert_model(model)
    set_tau(model, 1.0)
    assert dead_weight_share(model) == 0.0
    set_tau(model, 0.85)
    q_over_sigma = -math.log(2 - 2 * 0.85) * math.sqrt(2 / math.pi)
    assert dead_weight_share(model) == pytest.approx(math.erfc(q_over_sigma / 2**0.5), abs=0.004)
    with torch.no_grad():
        for _, m in binary_layers(model):
            m.weight.copy_(torch.distributions.Laplace(0.0, 1.0).sample(m.weight.shape))
    for tau in (0.85, 0.9, 0.99):
        set_tau(model, tau)
        assert dead_weight_share(model) == pytest.approx(2 * (1 - tau), abs=0.004), tau


def test_converting_twice_is_refused() -> None:
    model, _ = create_model("resnet20")
    model, _ = convert_model(model)
    with pytest.raises(RecuError, match="already binarized"):
        convert_model(model)
