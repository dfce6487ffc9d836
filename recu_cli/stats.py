"""Dead weights, entropy, quantization error, histograms and sign flips (docs/method.md s. 2).

Pure functions on tensors. `layer_stats` takes W1, b_hat, Q and W2 from
`ReCUConv2d.quantize()` (and the mask from `dead_mask()`), so these numbers can never drift
from what the layer trains with.

Units: every entropy recu reports is in **bits** (a balanced binary layer has 1 bit). The
paper's entropy of the clamped Laplace (Eq. 17) is a formula in nats; it is evaluated as
printed (`laplace_entropy_nats`) and reported divided by ln 2.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from recu_cli.binarize.functions import sign_pos
from recu_cli.binarize.layers import ReCUConv2d
from recu_cli.bnn import binary_layers
from recu_cli.pack.schema import LayerStats

HIST_BINS = 101
HIST_QUANTILE = 0.999  # histogram half-range: this quantile of |W1|
LN2 = math.log(2.0)


def binary_entropy_bits(p: torch.Tensor) -> torch.Tensor:
    """-p log2 p - (1-p) log2 (1-p), elementwise; 0 at p = 0 or 1, 1 at p = 0.5."""
    p = p.double()
    q = 1.0 - p
    h = -(torch.xlogy(p, p) + torch.xlogy(q, q)) / LN2
    return h.clamp_(min=0.0)


def _xlnx(x: float) -> float:
    return 0.0 if x <= 0.0 else x * math.log(x)


def qe_closed_form(b: float, tau: float) -> float:
    """Correct QE of a clamped Laplace(0, b): b^2 (-4t^2 + 8t - 3 + 4(1-t) ln(2-2t)).

    Written with (1-t) ln(2-2t) = x ln x / 2 (x = 2-2t) so tau = 1 gives its limit, b^2.
    """
    t = float(tau)
    return b * b * (-4 * t * t + 8 * t - 3 + 2 * _xlnx(2 - 2 * t))


def qe_closed_form_paper(b: float, tau: float) -> float:
    """The paper's printed form b^2 (-16t^3 + 44t^2 - 40t - 4(t-1) ln(2-2t) + 13).

    It differs from `qe_closed_form` by 16 b^2 (1-t)^3; kept for comparison only.
    """
    t = float(tau)
    return b * b * (-16 * t**3 + 44 * t * t - 40 * t + 2 * _xlnx(2 - 2 * t) + 13)


def laplace_entropy_nats(b: float, tau: float) -> float:
    """Paper Eq. 17, entropy of the clamped Laplace: H = 2 (ln b + 1) tau + ln(2/b) - 1."""
    return 2.0 * (math.log(b) + 1.0) * tau + math.log(2.0 / b) - 1.0


def laplace_dead_share(tau: float) -> float:
    """Share of a Laplace sample beyond its tau-quantile threshold Q(tau): 2 (1 - tau)."""
    return 2.0 * (1.0 - tau)


def quantization_error(w2: torch.Tensor) -> float:
    """E[(W2 - alpha sign(W2))^2] with alpha = E|W2| over the whole layer (one scalar).

    A single layer-wide alpha is the quantity the closed forms describe (they assume one
    Laplace per layer); sign(0) = +1 as everywhere in recu.
    """
    w2 = w2.detach().double()
    alpha = w2.abs().mean()
    return float(((w2 - alpha * sign_pos(w2)) ** 2).mean())


def histc_counts(x: torch.Tensor, bins: int, lo: float, hi: float) -> torch.Tensor:
    """torch.histc(x, bins, lo, hi) as int64 counts, computed as histc does (bin =
    trunc((x - lo) * bins / (hi - lo)) in x's dtype, hi in the last bin, values outside
    [lo, hi] dropped) but with bincount, which CUDA runs under deterministic algorithms
    (histc raises there)."""
    x = x.detach().flatten()
    edges = torch.tensor([lo, hi], dtype=x.dtype, device=x.device)  # histc's rounded edges
    left, right = edges[0], edges[1]
    x = x[(x >= left) & (x <= right)]
    idx = ((x - left) * bins / (right - left)).to(torch.int64).clamp_(max=bins - 1)
    return torch.bincount(idx, minlength=bins)


def histogram(w1: torch.Tensor, q: float | None) -> dict[str, Any]:
    """Counts of W1 in HIST_BINS equal bins over [-R, R].

    R = the 99.9th percentile of |W1| (widened to 1.1 Q when Q is finite and larger), so a
    few outliers of a pretrained layer do not squash the plot; values beyond +-R are
    counted in `below`/`above`, not folded into the edge bins.
    """
    w1 = w1.detach().float().flatten()
    a = w1.abs()
    r = 0.0
    if a.numel():
        k = max(1, math.ceil(HIST_QUANTILE * a.numel()))
        r = float(a.kthvalue(k).values)
        if q is not None:
            r = max(r, 1.1 * q)
        r = min(r, float(a.max()))
    if not r > 0:
        r = 1.0
    counts = histc_counts(w1, HIST_BINS, -r, r)
    return {
        "range": r,
        "bins": HIST_BINS,
        "counts": counts.tolist(),
        "below": int((w1 < -r).sum()),
        "above": int((w1 > r).sum()),
    }


def flip_counts(
    old_sign: torch.Tensor, new_sign: torch.Tensor, tail_mask: torch.Tensor | None = None
) -> dict[str, int]:
    """Numbers behind `flip_rates`, so that several layers can be pooled exactly."""
    if old_sign.shape != new_sign.shape:
        raise ValueError(f"sign shapes differ: {tuple(old_sign.shape)} vs {tuple(new_sign.shape)}")
    flipped = (old_sign >= 0) != (new_sign >= 0)
    out = {"flips": int(flipped.sum()), "n": flipped.numel()}
    if tail_mask is not None:
        if tail_mask.shape != flipped.shape:
            raise ValueError(
                f"tail mask shape {tuple(tail_mask.shape)} != sign shape {tuple(flipped.shape)}"
            )
        tail = tail_mask.to(torch.bool)
        out["tail_flips"] = int(flipped[tail].sum())
        out["tail_n"] = int(tail.sum())
        out["core_flips"] = out["flips"] - out["tail_flips"]
        out["core_n"] = out["n"] - out["tail_n"]
    return out


def rates_from_counts(c: dict[str, int]) -> dict[str, float | None]:
    """overall / tail / core flip rates; None where there is nothing to divide by."""

    def rate(k: str, n: str) -> float | None:
        return c[k] / c[n] if c.get(n) else None

    return {
        "overall": rate("flips", "n"),
        "tail": rate("tail_flips", "tail_n"),
        "core": rate("core_flips", "core_n"),
    }


def flip_rates(
    old_sign: torch.Tensor, new_sign: torch.Tensor, tail_mask: torch.Tensor | None = None
) -> dict[str, float | None]:
    """Share of weights whose sign changed: overall, among tail (dead) and core weights.

    Signs are +-1 tensors (raw latents work too: x >= 0 counts as +1, recu's sign(0) rule).
    `tail_mask` marks the dead weights of the OLDER checkpoint (|W1| > Q at that time);
    without it, or where a group is empty, that rate is None. Called per epoch by training.
    """
    return rates_from_counts(flip_counts(old_sign, new_sign, tail_mask))


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


@torch.no_grad()
def threshold_stats(beta: torch.Tensor | None) -> dict[str, float | None]:
    """Mean and largest |beta| of the activation thresholds (None without thresholds)."""
    if beta is None:
        return {"act_threshold_abs_mean": None, "act_threshold_abs_max": None}
    a = beta.detach().double().abs()
    return {"act_threshold_abs_mean": float(a.mean()), "act_threshold_abs_max": float(a.max())}


def layer_stats(layer: ReCUConv2d) -> dict[str, Any]:
    """Every section-2 statistic of one binary layer, as JSON-ready numbers (the keys of
    the packed format's `LayerStats`, which its validator checks).

    q is None when Q(tau) is infinite (tau = 1, no clamp). Entropies in bits.
    """
    qz = layer.quantize()
    w1, w2 = qz.w1.detach(), qz.w2.detach()
    b_hat = float(qz.b_hat)
    q = _finite(float(qz.q))
    tau = float(layer.tau)
    dead = layer.dead_mask()
    plus = layer.binary_weight().detach() > 0
    per_channel = binary_entropy_bits(plus.flatten(1).double().mean(dim=1))
    p = float(plus.double().mean())
    qe = quantization_error(w2)
    has_b = b_hat > 0
    return LayerStats(
        shape=list(w1.shape),
        weights=w1.numel(),
        tau=tau,
        clamp=bool(layer.clamp),
        b_hat=b_hat,
        q=q,
        dead_share=float(dead.double().mean()),
        dead_count=int(dead.sum()),
        plus_share=p,
        entropy_bits=float(binary_entropy_bits(torch.tensor(p))),
        entropy_ch_min_bits=float(per_channel.min()),
        entropy_ch_mean_bits=float(per_channel.mean()),
        qe=qe,
        qe_over_b2=qe / (b_hat * b_hat) if has_b else None,
        qe_closed=qe_closed_form(b_hat, tau),
        qe_closed_paper=qe_closed_form_paper(b_hat, tau),
        laplace_entropy_bits=laplace_entropy_nats(b_hat, tau) / LN2 if has_b else None,
        alpha_mean=float(layer.effective_alpha().detach().double().mean()),
        **threshold_stats(layer.act_threshold),
        hist=histogram(w1, q),
    ).to_dict()


@torch.no_grad()
def model_stats(model: nn.Module) -> list[dict[str, Any]]:
    """`layer_stats` of every ReCUConv2d in module order, each with its dotted name first:
    what a packed file stores (`pack.save(..., stats=model_stats(model))`)."""
    return [{"name": name, **layer_stats(m)} for name, m in binary_layers(model)]


@torch.no_grad()
def dead_weight_share(model: nn.Module) -> float:
    """Share of latent weights with |W1| > Q(tau) over all binary layers."""
    dead = total = 0
    for _, m in binary_layers(model):
        mask = m.dead_mask()
        dead += int(mask.sum())
        total += mask.numel()
    return dead / total if total else 0.0


def totals(stats: list[dict[str, Any]]) -> dict[str, Any]:
    """Weight-count-weighted aggregates over layers (what a one-line summary shows)."""
    n = sum(int(s.get("weights") or 0) for s in stats)

    def wmean(key: str) -> float | None:
        pairs = [(s.get(key), int(s.get("weights") or 0)) for s in stats]
        pairs = [(v, w) for v, w in pairs if isinstance(v, (int, float)) and w]
        den = sum(w for _, w in pairs)
        return sum(v * w for v, w in pairs) / den if den else None

    return {
        "layers": len(stats),
        "weights": n,
        "dead_share": wmean("dead_share"),
        "plus_share": wmean("plus_share"),
        "entropy_bits": wmean("entropy_bits"),
        "qe_over_b2": wmean("qe_over_b2"),
    }
