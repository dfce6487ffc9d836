"""`recu analyze --plot`: per-layer W1 histograms (dead tails shaded, +-Q lines) and a panel
of dead-weight share and entropy per layer. matplotlib is an optional extra."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from recu_cli.atomic import atomic_path
from recu_cli.errors import RecuError

CORE = "#4c72b0"
TAIL = "#d62728"


def require_matplotlib() -> None:
    """Fail early, in one line, before any work is done."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise RecuError("--plot needs matplotlib; pip install 'recu[plot]'") from None


def _short(name: str) -> str:
    return name.replace("layer", "L").replace(".conv", ".c")


def plot_analysis(result: dict[str, Any], out: str | Path) -> Path:
    """Write the figure for an `analyze` result to `out` (format from the suffix)."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.gridspec import GridSpec

    layers = [s for s in result["layers"] if (s.get("hist") or {}).get("counts")]
    n = max(1, len(layers))
    ncols = min(6, n)
    nrows = math.ceil(n / ncols)
    fig = plt.figure(figsize=(2.6 * ncols + 0.6, 1.9 * nrows + 3.2), dpi=110)
    gs = GridSpec(
        nrows + 1, ncols, figure=fig, height_ratios=[1.0] * nrows + [1.5], hspace=0.75, wspace=0.3
    )
    for i, s in enumerate(layers):
        ax = fig.add_subplot(gs[i // ncols, i % ncols])
        _histogram(ax, s)
    ax = fig.add_subplot(gs[nrows, :])
    _panel(ax, result["layers"], result.get("compare"))
    tau = result.get("tau")
    fig.suptitle(
        f"{result['model']}: standardized latent weights W1 per binary layer "
        f"(tau {tau:.3f}; red = dead tail |W1| > Q)"
        if isinstance(tau, (int, float))
        else f"{result['model']}: standardized latent weights W1 per binary layer",
        fontsize=11,
    )
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp:  # the temporary name hides the suffix: say the format
            fig.savefig(tmp, format=out.suffix[1:].lower() or "png", bbox_inches="tight")
    except (OSError, ValueError) as e:
        raise RecuError(
            f"cannot write the plot {out} ({e}); use a .png/.pdf/.svg path in a writable folder"
        ) from e
    finally:
        plt.close(fig)
    return out


def _histogram(ax: Any, s: dict[str, Any]) -> None:
    h = s["hist"]
    counts, r = h["counts"], float(h["range"])
    nb = len(counts)
    width = 2 * r / nb
    centers = [-r + (i + 0.5) * width for i in range(nb)]
    q = s.get("q")
    edges = [-r + i * width for i in range(nb + 1)]
    dead = [q is not None and abs(c) > q for c in centers]
    ax.stairs(
        [0 if d else c for c, d in zip(counts, dead, strict=True)], edges, fill=True, color=CORE
    )
    if any(dead):
        ax.stairs(
            [c if d else 0 for c, d in zip(counts, dead, strict=True)], edges, fill=True, color=TAIL
        )
    if q is not None and q < r:
        for x in (-q, q):
            ax.axvline(x, color="black", linestyle="--", linewidth=0.8)
        ax.axvspan(-r, -q, color=TAIL, alpha=0.08, linewidth=0)
        ax.axvspan(q, r, color=TAIL, alpha=0.08, linewidth=0)
    dead = s.get("dead_share")
    label = f"dead {100 * dead:.1f}%" if isinstance(dead, (int, float)) else ""
    ax.set_title(f"{_short(s['name'])}  {label}", fontsize=8)
    ax.set_xlim(-r, r)
    ax.set_yticks([])
    ax.tick_params(axis="x", labelsize=7)


def _panel(ax: Any, layers: list[dict[str, Any]], compare: dict[str, Any] | None) -> None:
    names = [_short(s["name"]) for s in layers]
    x = list(range(len(layers)))
    dead = [100 * (s.get("dead_share") or 0.0) for s in layers]
    ax.bar(x, dead, color=TAIL, alpha=0.75, label="dead weights (%)")
    fit = [
        200 * (1 - s["tau"]) if isinstance(s.get("tau"), (int, float)) else float("nan")
        for s in layers
    ]
    (hfit,) = ax.plot(
        x,
        fit,
        "_",
        color="black",
        markersize=14,
        markeredgewidth=1.5,
        label="Laplace fit 2(1-tau) (%)",
    )
    top = max([*dead, *(f for f in fit if f == f), 1.0])
    ax.set_ylim(0, 1.35 * top)
    ax.set_ylabel("dead weights (%)", color=TAIL, fontsize=9)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    ax.tick_params(axis="y", labelsize=8)
    ax.set_xlim(-0.6, len(layers) - 0.4)
    handles = ([ax.containers[0]] if ax.containers else []) + [hfit]
    right = ax.twinx()
    ent = [s.get("entropy_bits") for s in layers]
    ent_min = [s.get("entropy_ch_min_bits") for s in layers]
    (h1,) = right.plot(
        x,
        [e if e is not None else float("nan") for e in ent],
        "o-",
        color=CORE,
        label="binary entropy, layer (bits)",
    )
    (h2,) = right.plot(
        x,
        [e if e is not None else float("nan") for e in ent_min],
        "s:",
        color=CORE,
        alpha=0.6,
        label="binary entropy, worst channel (bits)",
    )
    handles += [h1, h2]
    if compare:
        flips = {e["name"]: e.get("overall") for e in compare["layers"]}
        (h3,) = right.plot(
            x,
            [flips.get(s["name"]) or float("nan") for s in layers],
            "^-",
            color="#2ca02c",
            label="sign flips since older file (share)",
        )
        handles.append(h3)
    right.set_ylim(0, 1.05)
    right.set_ylabel("entropy (bits) / share", color=CORE, fontsize=9)
    right.tick_params(axis="y", labelsize=8)
    ax.legend(
        handles=handles,
        fontsize=7,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.32),
        ncol=3,
        frameon=False,
    )
    ax.set_title(
        "per binary layer: dead-weight share and entropy of the binary weights", fontsize=9
    )
