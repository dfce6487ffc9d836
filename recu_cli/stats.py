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


def to_host(tree: Any) -> Any:
    """Every tensor in a nested dict/list, read to the host in ONE transfer (one GPU sync
    for all of an epoch's statistics): a 0-dim tensor becomes a float, any other a list of
    floats. Values pass through float64, exact for float32 numbers and counts below 2^53."""
    found: list[torch.Tensor] = []

    def collect(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            found.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                collect(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                collect(v)

    collect(tree)
    if not found:
        return tree
    device = found[0].device
    flat = torch.cat([t.detach().reshape(-1).to(device, torch.float64) for t in found]).tolist()
    pos = 0

    def rebuild(x: Any) -> Any:
        nonlocal pos
        if isinstance(x, torch.Tensor):
            n = x.numel()
            out = flat[pos] if x.dim() == 0 else flat[pos : pos + n]
            pos += n
            return out
        if isinstance(x, dict):
            return {k: rebuild(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(rebuild(v) for v in x)
        return x

    return rebuild(tree)


def quantization_error_tensor(w2: torch.Tensor) -> torch.Tensor:
    """E[(W2 - alpha sign(W2))^2] with alpha = E|W2| over the whole layer (one scalar), as a
    float64 tensor on W2's device.

    A single layer-wide alpha is the quantity the closed forms describe (they assume one
    Laplace per layer); sign(0) = +1 as everywhere in recu.
    """
    w2 = w2.detach().double()
    alpha = w2.abs().mean()
    return ((w2 - alpha * sign_pos(w2)) ** 2).mean()


def quantization_error(w2: torch.Tensor) -> float:
    """`quantization_error_tensor` as a Python float."""
    return float(quantization_error_tensor(w2))


def histc_counts(
    x: torch.Tensor, bins: int, lo: float | torch.Tensor, hi: float | torch.Tensor
) -> torch.Tensor:
    """torch.histc(x, bins, lo, hi) as int64 counts, computed as histc does (bin =
    trunc((x - lo) * bins / (hi - lo)) in x's dtype, hi in the last bin, values outside
    [lo, hi] dropped) but with bincount, which CUDA runs under deterministic algorithms
    (histc raises there). lo and hi may be 0-dim tensors on x's device (no host read)."""
    x = x.detach().flatten()
    if isinstance(lo, torch.Tensor) or isinstance(hi, torch.Tensor):
        ends = [torch.as_tensor(v, dtype=torch.float64, device=x.device) for v in (lo, hi)]
        edges = torch.stack(ends).to(x.dtype)  # histc's edges, rounded to x's dtype
    else:
        edges = torch.tensor([lo, hi], dtype=x.dtype, device=x.device)
    left, right = edges[0], edges[1]
    x = x[(x >= left) & (x <= right)]
    idx = ((x - left) * bins / (right - left)).to(torch.int64).clamp_(max=bins - 1)
    return torch.bincount(idx, minlength=bins)


def histogram_tensors(w1: torch.Tensor, q: float | torch.Tensor | None) -> dict[str, Any]:
    """`histogram`'s numbers as device tensors (read them with `to_host`)."""
    w1 = w1.detach().float().flatten()
    a = w1.abs()
    r = torch.zeros((), dtype=torch.float64, device=w1.device)
    if a.numel():
        k = max(1, math.ceil(HIST_QUANTILE * a.numel()))
        r = a.kthvalue(k).values.double()
        if q is not None:
            q64 = torch.as_tensor(q, dtype=torch.float64, device=w1.device)
            r = torch.where(torch.isfinite(q64), torch.maximum(r, 1.1 * q64), r)
        r = torch.minimum(r, a.max().double())
    r = torch.where(r > 0, r, torch.ones_like(r))  # also for nan
    return {
        "range": r,
        "bins": HIST_BINS,
        "counts": histc_counts(w1, HIST_BINS, -r, r),
        "below": (w1 < -r).sum(),
        "above": (w1 > r).sum(),
    }


def histogram(w1: torch.Tensor, q: float | None) -> dict[str, Any]:
    """Counts of W1 in HIST_BINS equal bins over [-R, R].

    R = the 99.9th percentile of |W1| (widened to 1.1 Q when Q is finite and larger), so a
    few outliers of a pretrained layer do not squash the plot; values beyond +-R are
    counted in `below`/`above`, not folded into the edge bins.
    """
    return _host_histogram(to_host(histogram_tensors(w1, q)))


def _host_histogram(h: dict[str, Any]) -> dict[str, Any]:
    return {
        "range": h["range"],
        "bins": h["bins"],
        "counts": [int(c) for c in h["counts"]],
        "below": int(h["below"]),
        "above": int(h["above"]),
    }


def flip_count_tensor(
    old_sign: torch.Tensor, new_sign: torch.Tensor, tail_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """[flips, n, tail_flips, tail_n] as an int64 tensor on the signs' device (no host
    read; the tail entries are 0 without a mask). Signs: x >= 0 counts as +1."""
    if old_sign.shape != new_sign.shape:
        raise ValueError(f"sign shapes differ: {tuple(old_sign.shape)} vs {tuple(new_sign.shape)}")
    flipped = (old_sign >= 0) != (new_sign >= 0)
    zero = torch.zeros((), dtype=torch.int64, device=flipped.device)
    tail_flips = tail_n = zero
    if tail_mask is not None:
        if tail_mask.shape != flipped.shape:
            raise ValueError(
                f"tail mask shape {tuple(tail_mask.shape)} != sign shape {tuple(flipped.shape)}"
            )
        tail = tail_mask.to(torch.bool)
        tail_flips, tail_n = (flipped & tail).sum(), tail.sum()
    n = torch.full((), flipped.numel(), dtype=torch.int64, device=flipped.device)
    return torch.stack([flipped.sum(), n, tail_flips, tail_n])


def flip_counts(
    old_sign: torch.Tensor, new_sign: torch.Tensor, tail_mask: torch.Tensor | None = None
) -> dict[str, int]:
    """Numbers behind `flip_rates`, so that several layers can be pooled exactly."""
    return counts_dict(flip_count_tensor(old_sign, new_sign, tail_mask).tolist(), tail_mask)


def counts_dict(c: list[float] | list[int], tails: Any = True) -> dict[str, int]:
    """[flips, n, tail_flips, tail_n] as flip_counts' dict (tail keys only with tails)."""
    flips, n, tail_flips, tail_n = (int(v) for v in c)
    out = {"flips": flips, "n": n}
    if tails is not None:
        out.update(tail_flips=tail_flips, tail_n=tail_n)
        out.update(core_flips=flips - tail_flips, core_n=n - tail_n)
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
    return to_host(_threshold_tensors(beta))


def _threshold_tensors(beta: torch.Tensor | None) -> dict[str, Any]:
    if beta is None:
        return {"act_threshold_abs_mean": None, "act_threshold_abs_max": None}
    a = beta.detach().double().abs()
    return {"act_threshold_abs_mean": a.mean(), "act_threshold_abs_max": a.max()}


@torch.no_grad()
def _layer_tensors(layer: ReCUConv2d) -> dict[str, Any]:
    """The device-side numbers of `layer_stats` (no host read)."""
    qz = layer.quantize()
    w1, w2 = qz.w1.detach(), qz.w2.detach()
    dead = layer.dead_mask()
    plus = layer.binary_weight().detach() > 0
    per_channel = binary_entropy_bits(plus.flatten(1).double().mean(dim=1))
    return {
        "b_hat": qz.b_hat,
        "q": qz.q,
        "tau": layer.tau,
        "dead_share": dead.double().mean(),
        "dead_count": dead.sum(),
        "plus_share": plus.double().mean(),
        "entropy_ch_min_bits": per_channel.min(),
        "entropy_ch_mean_bits": per_channel.mean(),
        "qe": quantization_error_tensor(w2),
        "alpha_mean": layer.effective_alpha().detach().double().mean(),
        "thresholds": _threshold_tensors(layer.act_threshold),
        "hist": histogram_tensors(w1, qz.q),
        "shape": list(w1.shape),
        "weights": w1.numel(),
    }


def _layer_record(layer: ReCUConv2d, t: dict[str, Any]) -> dict[str, Any]:
    """`layer_stats` from the numbers of `_layer_tensors`, read to the host."""
    b_hat = t["b_hat"]
    q = _finite(t["q"])
    tau = t["tau"]
    p = t["plus_share"]
    qe = t["qe"]
    has_b = b_hat > 0
    return LayerStats(
        shape=t["shape"],
        weights=t["weights"],
        tau=tau,
        clamp=bool(layer.clamp),
        b_hat=b_hat,
        q=q,
        dead_share=t["dead_share"],
        dead_count=int(t["dead_count"]),
        plus_share=p,
        entropy_bits=float(binary_entropy_bits(torch.tensor(p))),
        entropy_ch_min_bits=t["entropy_ch_min_bits"],
        entropy_ch_mean_bits=t["entropy_ch_mean_bits"],
        qe=qe,
        qe_over_b2=qe / (b_hat * b_hat) if has_b else None,
        qe_closed=qe_closed_form(b_hat, tau),
        qe_closed_paper=qe_closed_form_paper(b_hat, tau),
        laplace_entropy_bits=laplace_entropy_nats(b_hat, tau) / LN2 if has_b else None,
        alpha_mean=t["alpha_mean"],
        **t["thresholds"],
        hist=_host_histogram(t["hist"]),
    ).to_dict()


def layer_stats(layer: ReCUConv2d) -> dict[str, Any]:
    """Every section-2 statistic of one binary layer, as JSON-ready numbers (the keys of
    the packed format's `LayerStats`, which its validator checks).

    q is None when Q(tau) is infinite (tau = 1, no clamp). Entropies in bits.
    """
    return _layer_record(layer, to_host(_layer_tensors(layer)))


@torch.no_grad()
def model_stats(model: nn.Module) -> list[dict[str, Any]]:
    """`layer_stats` of every ReCUConv2d in module order, each with its dotted name first;
    computed on the model's device and read back in one transfer."""
    layers = binary_layers(model)
    numbers = to_host([_layer_tensors(m) for _, m in layers])
    return [{"name": n, **_layer_record(m, t)} for (n, m), t in zip(layers, numbers, strict=True)]


@torch.no_grad()
def dead_weight_counts(model: nn.Module) -> torch.Tensor:
    """[dead, total] latent weights (|W1| > Q(tau)) over all binary layers, int64 on the
    model's device (no host read)."""
    masks = [m.dead_mask() for _, m in binary_layers(model)]
    if not masks:
        return torch.zeros(2, dtype=torch.int64)
    dead = torch.stack([mask.sum() for mask in masks]).sum()
    total = torch.full((), sum(mask.numel() for mask in masks), dtype=torch.int64)
    return torch.stack([dead, total.to(dead.device)])


def share_of(counts: list[float]) -> float:
    """dead / total from `dead_weight_counts` read to the host (0 without weights)."""
    dead, total = (int(v) for v in counts)
    return dead / total if total else 0.0


@torch.no_grad()
def dead_weight_share(model: nn.Module) -> float:
    """Share of latent weights with |W1| > Q(tau) over all binary layers."""
    return share_of(dead_weight_counts(model).tolist())


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
