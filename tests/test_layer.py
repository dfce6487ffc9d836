"""ReCU layer numerics against hand-computed values (docs/method.md section 1)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from recu_cli.binarize import BinaryConv2d, ReCUConv2d, sign_pos, tau_schedule
from recu_cli.binarize.functions import (
    _ApproxSign,
    _RescaledApproxSign,
    activation_sign,
    rescale_activation,
    weight_sign_ste,
)
from recu_cli.binarize.weights import ReCUWeightSign


def make_layer(**kw) -> ReCUConv2d:
    torch.manual_seed(1)
    layer = ReCUConv2d(6, 8, 3, padding=1, **kw)
    with torch.no_grad():
        layer.weight.copy_(torch.distributions.Laplace(0.3, 0.05).sample(layer.weight.shape))
    return layer


def test_threshold_at_tau_085_is_1_2040_b_hat() -> None:
    layer = make_layer(tau=0.85)
    qz = layer.quantize()
    assert qz.q.item() == pytest.approx(1.2040 * qz.b_hat.item(), rel=1e-4)
    assert -math.log(2 - 2 * 0.85) == pytest.approx(1.2040, abs=1e-4)
    assert not qz.b_hat.requires_grad


def test_threshold_is_infinite_at_tau_1() -> None:
    layer = make_layer(tau=1.0)
    qz = layer.quantize()
    assert math.isinf(qz.q.item())
    assert torch.equal(qz.w2, qz.w1)


def test_standardization_matches_formula() -> None:
    layer = make_layer(b_star=2.0)
    w = layer.weight.detach().double()
    w0 = w - w.mean(dim=(1, 2, 3), keepdim=True)
    var = w0.var(dim=(1, 2, 3), keepdim=True, unbiased=True)
    expected = math.sqrt(2) * 2.0 * w0 / torch.sqrt(var + 1e-5)
    torch.testing.assert_close(layer.quantize().w1.double(), expected, rtol=1e-5, atol=1e-5)
    b_hat = expected.abs().mean()
    assert layer.quantize().b_hat.item() == pytest.approx(b_hat.item(), rel=1e-5)


def test_forward_does_not_depend_on_tau() -> None:
    layer = make_layer()
    x = torch.randn(3, 6, 7, 7)
    outs = []
    for tau in (0.6, 0.85, 0.99, 1.0):
        layer.set_tau(tau)
        outs.append(layer(x))
        w = layer.weight.detach()
        assert torch.equal(layer.binary_weight(), sign_pos(w - w.mean(dim=(1, 2, 3), keepdim=True)))
    for o in outs[1:]:
        assert torch.equal(o, outs[0])


def test_weight_gradient_is_zero_exactly_on_dead_weights() -> None:
    # without standardization W1 = W, so the latent gradient shows the clamp directly
    layer = make_layer(tau=0.85, standardize=False)
    x = torch.randn(4, 6, 5, 5)
    layer(x).square().sum().backward()
    dead = layer.dead_mask()
    assert 0 < dead.sum() < dead.numel()
    grad = layer.weight.grad
    assert torch.all(grad[dead] == 0)
    assert torch.count_nonzero(grad[~dead]) > 0.95 * (~dead).sum()


def test_weight_gradient_through_standardization_is_masked_at_w1() -> None:
    layer = make_layer(tau=0.85)
    qz = layer.quantize()
    qz.w1.retain_grad()
    out = F.conv2d(torch.randn(2, 6, 5, 5).sign(), weight_sign_ste(qz.w2), padding=1)
    out.square().sum().backward()
    dead = qz.w1.detach().abs() > qz.q
    assert dead.any()
    assert torch.all(qz.w1.grad[dead] == 0)
    assert torch.count_nonzero(qz.w1.grad[~dead]) > 0
    assert layer.weight.grad is not None  # flows on through mean and variance


def test_sign_zero_maps_to_plus_one() -> None:
    assert torch.equal(sign_pos(torch.tensor([-2.0, 0.0, 3.0])), torch.tensor([-1.0, 1.0, 1.0]))
    assert torch.equal(sign_pos(torch.tensor([-0.0])), torch.tensor([1.0]))


def test_approx_sign_gradient_values() -> None:
    a = torch.tensor([-1.5, -0.75, -0.25, 0.0, 0.25, 0.5, 1.0], requires_grad=True)
    _ApproxSign.apply(a).backward(torch.ones_like(a))
    assert a.grad.tolist() == [0.0, 0.5, 1.5, 2.0, 1.5, 1.0, 0.0]


def test_fused_rescale_gradient_equals_autograd_reference() -> None:
    a = torch.randn(3, 4, 5, 5, dtype=torch.double) * 3
    a.requires_grad_(True)
    g = torch.randn_like(a)
    _RescaledApproxSign.apply(a).backward(g)
    fused = a.grad.clone()
    a.grad = None
    _ApproxSign.apply(rescale_activation(a)).backward(g)
    torch.testing.assert_close(fused, a.grad)


def _approx_sign(x: torch.Tensor) -> torch.Tensor:
    """Bi-Real's ApproxSign itself (not its derivative): -1, 2x + x^2, 2x - x^2, +1 on
    (-inf, -1), [-1, 0), [0, 1), [1, inf); continuously differentiable, with derivative
    max(0, 2 - 2|x|), the surrogate gradient of recu-method.md section 1 step 7."""
    return torch.where(x.abs() >= 1, x.sign(), 2 * x - x * x.abs())


def test_fused_rescale_backward_is_the_derivative_of_approx_sign_of_a_over_s() -> None:
    """gradcheck of the fused op's own backward against finite differences of the smooth
    function it is the exact derivative of, ApproxSign(A / s) with s = sqrt(var(A) + eps)
    per sample (unbiased, not detached; written here independently of recu's code). The
    checked function has that smooth function's value and the op's gradient: sign() itself
    has no derivative for finite differences to check."""
    gen = torch.Generator().manual_seed(4)  # a draw with every A / s off the kinks below
    a = (torch.randn(3, 2, 3, 3, generator=gen, dtype=torch.double) * 3).requires_grad_(True)

    def scale(t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(t.var(dim=(1, 2, 3), keepdim=True, unbiased=True) + 1e-5)

    def checked(op):
        def f(t: torch.Tensor) -> torch.Tensor:
            out = op(t)
            return _approx_sign(t / scale(t)).detach() + (out - out.detach())

        return f

    x = (a / scale(a)).detach()
    assert ((x.abs() > 0.02) & ((x.abs() - 1).abs() > 0.02)).all()  # off the kinks
    assert (x.abs() < 1).float().mean() > 0.5  # most inside, where the gradient lives
    assert torch.autograd.gradcheck(checked(_RescaledApproxSign.apply), (a,), eps=1e-6, atol=1e-6)
    # the check bites: ApproxSign of A / s with s detached (its gradient lacks the terms
    # through the variance) fails it
    detached_s = checked(lambda t: _ApproxSign.apply(t / scale(t).detach()))
    assert not torch.autograd.gradcheck(detached_s, (a,), eps=1e-6, atol=1e-6,
                                        raise_exception=False)  # fmt: skip


def test_activation_rescale_only_in_training() -> None:
    layer = make_layer()
    x = (torch.randn(2, 6, 5, 5) * 4).requires_grad_(True)
    layer.train()
    layer(x).sum().backward()
    g_train = x.grad.clone()
    x.grad = None
    xb = activation_sign(x, rescale=False)
    F.conv2d(xb, layer.binary_weight().detach(), padding=1).mul(
        layer.alpha.detach()
    ).sum().backward()
    assert not torch.allclose(g_train, x.grad)  # eval-style (no rescale) gradient differs
    layer.eval()
    with torch.no_grad():
        y_eval = layer(x)
    layer.train()
    with torch.no_grad():
        y_train = layer(x)
    # sign(A / s) == sign(A): same signs; training folds alpha into the weights
    # (alpha * conv(x, w) == conv(x, alpha * w)), so the outputs agree to rounding
    torch.testing.assert_close(y_eval, y_train, rtol=1e-6, atol=1e-6)
    layer.alpha.data.fill_(1.0)  # alpha = 1: the fold is exact, so the forward is too
    with torch.no_grad():
        assert torch.equal(layer(x), layer.eval()(x))


def test_training_alpha_fold_matches_scaling_the_output() -> None:
    """conv(x, alpha * wb) in training: same output and gradients as alpha * conv(x, wb)."""
    layer = make_layer()
    x = torch.randn(3, 6, 7, 7, requires_grad=True)
    g = torch.randn(3, 8, 7, 7)
    layer.train()
    layer(x).backward(g)
    folded = [t.grad.clone() for t in (x, layer.weight, layer.alpha)]
    out_folded = layer(x).detach()
    for t in (x, layer.weight, layer.alpha):
        t.grad = None
    xb = activation_sign(x, rescale=True)
    wb = ReCUWeightSign.apply(layer.weight, layer.tau, layer.gain, True, True)
    ref = F.conv2d(xb, wb, padding=1) * layer.alpha
    ref.backward(g)
    torch.testing.assert_close(out_folded, ref.detach(), rtol=1e-6, atol=1e-6)
    for got, t in zip(folded, (x, layer.weight, layer.alpha), strict=True):
        scale = t.grad.abs().max().item()  # cancellations in the weight path: judge by scale
        torch.testing.assert_close(got, t.grad, rtol=0, atol=1e-6 * scale)


def test_alpha_learned_and_initialised_from_pretrained() -> None:
    conv = torch.nn.Conv2d(4, 5, 3, bias=False)
    layer = ReCUConv2d.from_conv(conv)
    w0 = conv.weight - conv.weight.mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(
        layer.alpha.detach().flatten(), w0.abs().mean(dim=(1, 2, 3)).detach()
    )
    assert layer.alpha.requires_grad and layer.alpha.shape == (5, 1, 1)
    assert "tau" in dict(layer.named_buffers())
    assert torch.equal(layer.weight, conv.weight)


def test_analytic_alpha_is_mean_abs_recu() -> None:
    layer = make_layer(alpha_mode="analytic", tau=0.9)
    w2 = layer.quantize().w2
    torch.testing.assert_close(layer.effective_alpha(), w2.abs().mean(dim=(1, 2, 3)).view(-1, 1, 1))


def test_deploy_form_matches_eval_output_exactly() -> None:
    layer = make_layer().eval()
    with torch.no_grad():
        layer.alpha.uniform_(0.5, 1.5)
    x = torch.randn(2, 6, 9, 9)
    x[0, 0, 0, 0] = 0.0
    deploy = BinaryConv2d.from_recu(layer)
    with torch.no_grad():
        assert torch.equal(deploy(x), layer(x))
    assert set(deploy.weight_sign.unique().tolist()) <= {-1.0, 1.0}


def test_tau_schedule_values() -> None:
    assert tau_schedule(0, 600) == pytest.approx(0.85)
    assert tau_schedule(599, 600) == pytest.approx(0.9896, abs=5e-5)
    assert tau_schedule(600, 600) == pytest.approx(0.99)
    assert tau_schedule(10, 20, 0.8, 0.9) == pytest.approx(
        (0.1 / (math.e - 1)) * math.exp(0.5) + 0.8 - 0.1 / (math.e - 1)
    )
    values = [tau_schedule(e, 10) for e in range(10)]
    assert values == sorted(values)


def test_layer_rejects_non_zero_padding() -> None:
    with pytest.raises(ValueError, match="zero padding"):
        ReCUConv2d(3, 3, 3, padding=1, padding_mode="reflect")


@pytest.mark.parametrize(
    ("standardize", "clamp", "tau"),
    [
        (True, True, 0.85),
        (True, True, 1.0),
        (False, True, 0.9),
        (False, False, 0.85),
        (True, False, 0.9),
    ],
)
def test_fused_weight_path_equals_reference(standardize: bool, clamp: bool, tau: float) -> None:
    """The layer's fused forward/backward equals autograd through `quantize()`."""
    layer = make_layer(standardize=standardize, clamp=clamp, tau=tau).double()
    x = torch.randn(2, 6, 6, 6, dtype=torch.double, requires_grad=True)
    g = torch.randn(2, 8, 6, 6, dtype=torch.double)
    layer(x).backward(g)
    fused_w, fused_x, fused_a = layer.weight.grad.clone(), x.grad.clone(), layer.alpha.grad.clone()
    layer.zero_grad()
    x.grad = None
    wb = weight_sign_ste(layer.quantize().w2)
    xb = activation_sign(x, rescale=True)
    ref = F.conv2d(xb, wb, None, layer.stride, layer.padding) * layer.alpha
    ref.backward(g)
    torch.testing.assert_close(fused_w, layer.weight.grad)
    torch.testing.assert_close(fused_x, x.grad)
    torch.testing.assert_close(fused_a, layer.alpha.grad)
    assert fused_w.abs().sum() > 0
