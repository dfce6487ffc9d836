"""recu_cli.stats against hand-computed values and the Laplace theory of docs/method.md s. 2."""

from __future__ import annotations

import math

import pytest
import torch

from recu_cli import bnn
from recu_cli.binarize.layers import ReCUConv2d
from recu_cli.bnn import convert_model
from recu_cli.convert_config import ConvertConfig
from recu_cli.models import create_model
from recu_cli.stats import (
    HIST_BINS,
    binary_entropy_bits,
    dead_weight_share,
    flip_rates,
    laplace_dead_share,
    laplace_entropy_nats,
    layer_stats,
    model_stats,
    qe_closed_form,
    qe_closed_form_paper,
    quantization_error,
    totals,
)


def raw_layer(weight: torch.Tensor, tau: float) -> ReCUConv2d:
    """A ReCU layer whose W1 is exactly `weight` (no standardization)."""
    o, i, kh, kw = weight.shape
    layer = ReCUConv2d(i, o, (kh, kw), tau=tau, standardize=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer


def test_binary_entropy_in_bits() -> None:
    h = binary_entropy_bits(torch.tensor([0.0, 0.5, 1.0, 0.25]))
    assert h.tolist() == pytest.approx([0.0, 1.0, 0.0, 0.8112781244591328])


def test_tiny_layer_by_hand() -> None:
    # W1 = W (no standardization); b_hat = mean|W| = 10/8 = 1.25; tau chosen so Q = 1.5.
    w = torch.tensor([[3.0, -1.0, 0.5, -0.5], [1.0, 1.0, -1.0, 2.0]]).view(2, 1, 1, 4)
    tau = 1 - math.exp(-1.2) / 2  # -1.25 * ln(2 - 2 tau) = 1.5
    s = layer_stats(raw_layer(w, tau))
    assert s["b_hat"] == pytest.approx(1.25)
    assert s["q"] == pytest.approx(1.5, rel=1e-6)
    assert s["dead_share"] == 0.25 and s["dead_count"] == 2  # |3| and |2| exceed Q
    # W2 = [1.5, -1, .5, -.5 | 1, 1, -1, 1.5] -> signs [+ - + - | + + - +]
    assert s["plus_share"] == 5 / 8
    assert s["entropy_bits"] == pytest.approx(0.954434002924965)
    assert s["entropy_ch_min_bits"] == pytest.approx(0.8112781244591328)
    assert s["entropy_ch_mean_bits"] == pytest.approx((1 + 0.8112781244591328) / 2)
    # alpha = E|W2| = 8/8 = 1; squared errors .25, 0, .25, .25, 0, 0, 0, .25 -> mean 1/8
    assert s["qe"] == pytest.approx(0.125, rel=1e-6)
    assert s["qe_over_b2"] == pytest.approx(0.125 / 1.5625, rel=1e-6)
    h = s["hist"]
    assert h["bins"] == HIST_BINS and sum(h["counts"]) + h["below"] + h["above"] == 8


def test_tau_one_means_no_clamp() -> None:
    s = layer_stats(raw_layer(torch.randn(4, 3, 3, 3), 1.0))
    assert s["q"] is None and s["dead_share"] == 0.0
    assert s["qe_closed"] == pytest.approx(s["b_hat"] ** 2)  # E[(W - b sign W)^2] = b^2


def test_quantization_error_sign_zero_is_plus_one() -> None:
    # [0, 2]: alpha = 1, sign(0) = +1 -> errors (0-1)^2, (2-1)^2 -> 1
    assert quantization_error(torch.tensor([0.0, 2.0])) == pytest.approx(1.0)


def _numeric_qe(tau: float, b: float = 1.0) -> float:
    """E[W2^2] - (E|W2|)^2 for clamp(Laplace(0, b), +-Q), by the trapezoid rule."""
    q = -b * math.log(2 - 2 * tau)
    x = torch.linspace(0, 60 * b, 3_000_001, dtype=torch.float64)
    p = torch.exp(-x / b) / b  # density of |W|
    c = torch.clamp(x, max=q)
    e_abs = torch.trapezoid(c * p, x)
    e_sq = torch.trapezoid(c * c * p, x)
    return float(e_sq - e_abs**2)


@pytest.mark.parametrize(
    ("tau", "correct", "paper"),
    # hand values: -4t^2+8t-3+4(1-t)ln(2-2t), plus 16(1-t)^3 for the paper's form
    [(0.85, 0.1876163, 0.2416163), (0.99, 0.8431191, 0.8431351)],
)
def test_closed_forms(tau: float, correct: float, paper: float) -> None:
    assert qe_closed_form(1.0, tau) == pytest.approx(correct, abs=1e-6)
    assert qe_closed_form_paper(1.0, tau) == pytest.approx(paper, abs=1e-6)
    assert qe_closed_form(1.0, tau) == pytest.approx(_numeric_qe(tau), abs=1e-6)
    assert qe_closed_form(2.0, tau) == pytest.approx(4 * correct, abs=4e-6)
    diff = qe_closed_form_paper(1.0, tau) - qe_closed_form(1.0, tau)
    assert diff == pytest.approx(16 * (1 - tau) ** 3)


def test_laplace_entropy_formula() -> None:
    # tau = 1: the Laplace differential entropy ln(2 e b)
    assert laplace_entropy_nats(1.0, 1.0) == pytest.approx(math.log(2 * math.e))
    assert laplace_entropy_nats(2.0, 0.85) == pytest.approx(
        2 * (math.log(2) + 1) * 0.85 + math.log(1.0) - 1
    )


@pytest.mark.parametrize("tau", [0.85, 0.99])
def test_laplace_sample_matches_theory(tau: float) -> None:
    torch.manual_seed(0)
    w = torch.distributions.Laplace(0.0, 1.7).sample((1000, 1, 1, 2000))
    s = layer_stats(raw_layer(w, tau))
    assert s["b_hat"] == pytest.approx(1.7, rel=3e-3)
    assert s["dead_share"] == pytest.approx(laplace_dead_share(tau), abs=2e-3)
    assert s["qe"] == pytest.approx(s["qe_closed"], rel=1e-2)
    if tau == 0.85:  # the paper's printed form is ~29% off here
        assert abs(s["qe"] - s["qe_closed_paper"]) > 0.2 * s["qe"]


def test_flip_rates_by_hand() -> None:
    old = torch.tensor([1.0, -1, 1, -1, 1, 1])
    new = torch.tensor([1.0, 1, -1, -1, 1, -1])  # flips at 1, 2, 5
    tail = torch.tensor([True, True, False, False, False, False])
    assert flip_rates(old, new, tail) == {"overall": 0.5, "tail": 0.5, "core": 0.5}
    tail = torch.tensor([True, False, False, False, False, False])
    assert flip_rates(old, new, tail) == {"overall": 0.5, "tail": 0.0, "core": 0.6}
    assert flip_rates(old, new) == {"overall": 0.5, "tail": None, "core": None}
    none_dead = torch.zeros(6, dtype=torch.bool)
    assert flip_rates(old, new, none_dead)["tail"] is None
    # raw values: 0 counts as +1 (recu's sign(0) rule), so 0 -> 0.3 is no flip
    assert flip_rates(torch.tensor([0.0, -0.1]), torch.tensor([0.3, 0.0]))["overall"] == 0.5
    with pytest.raises(ValueError):
        flip_rates(old, new[:5])


def test_model_stats_on_a_converted_model() -> None:
    net, _ = create_model("resnet20")
    net, _ = convert_model(net, ConvertConfig(tau=0.9))
    stats = model_stats(net)
    assert [s["name"] for s in stats] == [n for n, _ in bnn.binary_layers(net)]
    share = dead_weight_share(net)
    masks = [m.dead_mask() for _, m in bnn.binary_layers(net)]
    assert share == pytest.approx(sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks))
    assert totals(stats)["dead_share"] == pytest.approx(share)
    for s in stats:
        assert 0.0 <= s["entropy_ch_min_bits"] <= s["entropy_ch_mean_bits"] <= 1.0
        assert s["tau"] == pytest.approx(0.9)
