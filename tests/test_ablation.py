"""Ablation switches change the layer as stated; flip-rate bookkeeping on a hand-made case."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from recu_cli.binarize import ReCUConv2d, sign_pos
from recu_cli.bnn import convert_model, set_tau
from recu_cli.convert_config import ConvertConfig
from recu_cli.models import create_model
from recu_cli.stats import dead_weight_share
from recu_cli.training import FlipTracker


def laplace_layer(**kw) -> ReCUConv2d:
    torch.manual_seed(3)
    layer = ReCUConv2d(16, 8, 3, padding=1, **kw)
    with torch.no_grad():
        layer.weight.copy_(torch.distributions.Laplace(0.2, 0.1).sample(layer.weight.shape))
    return layer


def test_plain_sign_is_sign_of_raw_weights_without_clamp() -> None:
    cfg = ConvertConfig.from_flags(plain_sign=True, tau=0.85)  # as --plain-sign sets it
    assert not cfg.standardize and not cfg.clamp
    layer = laplace_layer(**cfg.layer_kwargs())
    w = layer.weight.detach()
    assert torch.equal(layer.binary_weight(), sign_pos(w))  # not centred: mean 0.2 shows
    assert not torch.equal(layer.binary_weight(), sign_pos(w - w.mean(dim=(1, 2, 3), keepdim=True)))
    layer(torch.randn(2, 16, 5, 5)).square().sum().backward()
    assert torch.count_nonzero(layer.weight.grad) > 0.99 * layer.weight.numel()  # no clamp


def test_no_standardize_uses_raw_weights_but_keeps_the_clamp() -> None:
    cfg = ConvertConfig.from_flags(no_standardize=True, tau=0.85)
    layer = laplace_layer(**cfg.layer_kwargs())
    qz = layer.quantize()
    assert torch.equal(qz.w1, layer.weight)
    assert qz.b_hat.item() == pytest.approx(layer.weight.abs().mean().item(), rel=1e-6)
    layer(torch.randn(2, 16, 5, 5)).square().sum().backward()
    dead = layer.dead_mask()
    assert dead.any() and torch.all(layer.weight.grad[dead] == 0)


@pytest.mark.parametrize("b_star", [0.71, 1.0, 2.0, 3.0])
def test_b_star_sets_the_scale_of_the_standardized_weights(b_star: float) -> None:
    layer = laplace_layer(b_star=b_star)
    w1 = layer.quantize().w1.detach()
    std = w1.std(dim=(1, 2, 3), unbiased=True)
    torch.testing.assert_close(
        std, torch.full_like(std, math.sqrt(2) * b_star), rtol=1e-3, atol=1e-3
    )


def test_fixed_tau_one_turns_recu_off() -> None:
    model, _ = create_model("resnet20")
    model, _ = convert_model(model)
    set_tau(model, 1.0)
    assert dead_weight_share(model) == 0.0
    layer = model.layer1[0].conv1
    model.train()
    x = torch.randn(4, 3, 32, 32)
    out_off = model(x)
    out_off.sum().backward()
    grad_off = layer.weight.grad.clone()
    qz = layer.quantize()
    assert math.isinf(qz.q.item())
    assert torch.equal(qz.w2, qz.w1)  # nothing clamped
    # tau changes only the backward pass (recu-method.md section 1): at 0.85 the same
    # forward, but the clamped weights' gradient is cut, which changes every gradient
    set_tau(model, 0.85)
    model.zero_grad()
    out_on = model(x)
    out_on.sum().backward()
    assert torch.equal(out_on, out_off)
    qz = layer.quantize()
    dead = layer.dead_mask()
    assert 0.2 < dead.float().mean() < 0.5
    assert torch.equal(qz.w2[dead].abs(), qz.q.expand_as(qz.w2)[dead])  # clamped to +-Q
    assert not torch.allclose(layer.weight.grad, grad_off)


def test_alpha_modes_differ_as_stated() -> None:
    learned = laplace_layer(alpha_mode="learned")
    analytic = laplace_layer(alpha_mode="analytic", tau=0.85)
    assert isinstance(learned.alpha, nn.Parameter)
    assert not isinstance(analytic.alpha, nn.Parameter)
    w2 = analytic.quantize().w2
    torch.testing.assert_close(
        analytic.effective_alpha(), w2.abs().mean(dim=(1, 2, 3)).view(-1, 1, 1)
    )
    # the analytic scale follows the weights: alpha ~ b (2 tau - 1) for a Laplace layer
    b = analytic.quantize().b_hat.item()
    assert analytic.effective_alpha().mean().item() == pytest.approx(b * (2 * 0.85 - 1), rel=0.15)


def test_effective_alpha_is_pure_and_forward_records_the_analytic_scale() -> None:
    layer = laplace_layer(alpha_mode="analytic", tau=0.85)
    before = layer.alpha.clone()
    alpha = layer.effective_alpha()
    assert torch.equal(layer.alpha, before)  # asking for the scale changes nothing
    layer(torch.randn(2, layer.in_channels, 6, 6))
    assert torch.equal(layer.alpha, alpha.detach())  # the buffer holds the scale applied


def test_flip_tracker_on_a_hand_made_layer() -> None:
    """8 weights in one filter: 2 in the tails, 6 in the core; flip 1 tail and 2 core."""
    layer = ReCUConv2d(8, 1, 1, standardize=False, tau=0.85)
    model = nn.Sequential(layer)
    w = torch.tensor([3.0, -3.0, 0.1, -0.1, 0.2, -0.2, 0.3, -0.3]).view(1, 8, 1, 1)
    with torch.no_grad():
        layer.weight.copy_(w)
    qz = layer.quantize()
    tail = (qz.w1.abs() > qz.q).flatten().tolist()
    assert tail == [True, True, False, False, False, False, False, False]  # b_hat 0.9, Q 1.08
    tracker = FlipTracker()
    tracker.snapshot(model)
    with torch.no_grad():
        layer.weight.copy_(
            torch.tensor([-3.0, -3.0, -0.1, 0.1, 0.2, -0.2, 0.3, -0.3]).view(1, 8, 1, 1)
        )
    rates = tracker.rates(model)
    assert rates["flip_rate"] == pytest.approx(3 / 8)
    assert rates["flip_rate_tail"] == pytest.approx(1 / 2)
    assert rates["flip_rate_core"] == pytest.approx(2 / 6)
    restored = FlipTracker()
    restored.load(tracker.state())  # survives a resume
    assert restored.rates(model) == rates
