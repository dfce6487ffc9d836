"""recu's PReLU: ATen's forward and input gradient bit for bit, with a faster backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from recu_cli.blocks import sign_friendly_activation
from recu_cli.prelu import PReLU


def pair(channels: int) -> tuple[nn.PReLU, PReLU]:
    torch.manual_seed(0)
    ref = nn.PReLU(channels)
    ours = PReLU(channels)
    with torch.no_grad():
        ref.weight.uniform_(-0.6, 0.6)
        ours.weight.copy_(ref.weight)
    return ref, ours


def grads(module: nn.Module, x: torch.Tensor, g: torch.Tensor):
    x = x.clone().requires_grad_(True)
    y = module(x)
    gx, gw = torch.autograd.grad(y, (x, module.weight), g)
    return y, gx, gw


@pytest.mark.parametrize("channels", [1, 5])
def test_matches_aten_prelu(channels: int) -> None:
    ref, ours = pair(channels)
    x = torch.randn(4, 5, 6, 7)
    x[0, 0, 0, :4] = torch.tensor([0.0, -0.0, 1e-30, -1e-30])  # the x > 0 edge
    g = torch.randn(4, 5, 6, 7)
    y_ref, gx_ref, gw_ref = grads(ref, x, g)
    y, gx, gw = grads(ours, x, g)
    assert torch.equal(y, y_ref)
    assert torch.equal(gx, gx_ref)  # x > 0 ? g : w * g, one rounding, as ATen
    torch.testing.assert_close(gw, gw_ref)  # same sum, another order
    assert gw.shape == ours.weight.shape


def test_slope_gradient_by_hand() -> None:
    """dL/dw_c = sum of g * x over the non-positive x of channel c."""
    m = PReLU(2)
    x = torch.tensor([[[[1.0, -2.0]], [[0.0, -3.0]]]])  # [1, 2, 1, 2]
    g = torch.tensor([[[[5.0, 7.0]], [[11.0, 13.0]]]])
    _, gx, gw = grads(m, x, g)
    assert gw.tolist() == [-14.0, -39.0]  # 7 * -2; 11 * 0 + 13 * -3
    assert gx.flatten().tolist() == [5.0, 0.25 * 7.0, 0.25 * 11.0, 0.25 * 13.0]


def test_is_an_nn_prelu_with_the_same_state() -> None:
    """Export, the fused runtime and packed files see an ordinary nn.PReLU."""
    act = sign_friendly_activation("prelu", 8)
    assert isinstance(act, PReLU) and isinstance(act, nn.PReLU)
    assert type(act).__name__ == "PReLU"
    assert list(act.state_dict()) == list(nn.PReLU(8).state_dict())


def test_no_grad_and_frozen_paths_use_plain_prelu() -> None:
    ref, ours = pair(3)
    x = torch.randn(2, 3, 4, 4)
    x[0, 0, 0, :2] = torch.tensor([0.0, -0.0])  # the x > 0 edge
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x))
    for m in (ref, ours):
        m.weight.requires_grad_(False)  # frozen slopes: only the input's gradient
    g = torch.randn(2, 3, 4, 4)
    outs = []
    for m in (ref, ours):
        xr = x.clone().requires_grad_(True)
        y = m(xr)
        (gx,) = torch.autograd.grad(y, (xr,), g)
        outs.append((y, gx))
    (y_ref, gx_ref), (y, gx) = outs
    assert torch.equal(y, y_ref) and torch.equal(gx, gx_ref)  # ATen's, bit for bit
    assert ours.weight.grad is None


def test_bf16_autocast_step() -> None:
    m = nn.Sequential(nn.Conv2d(3, 4, 3), PReLU(4))
    x = torch.randn(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert m[1].weight.grad.dtype == torch.float32
    assert torch.isfinite(m[1].weight.grad).all() and torch.isfinite(m[0].weight.grad).all()
