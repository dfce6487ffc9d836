"""`recu analyze`: the statistics stored in a packed file, flip rates against another one,
as rich tables and terminal histograms. Reads metadata and packed bits only (no model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from recu_cli import pack
from recu_cli.errors import RecuError
from recu_cli.report.fit import Column, fitted_table
from recu_cli.stats import flip_counts, rates_from_counts, totals

BLOCKS = " ▁▂▃▄▅▆▇█"


def analyze(path: str | Path, compare: str | Path | None = None) -> dict[str, Any]:
    """JSON-ready analysis of one packed file (and flips since `compare`, the older one)."""
    packed = pack.read(path)
    result: dict[str, Any] = {
        "file": str(packed.path),
        "model": packed.spec.full_name,
        "format_version": packed.format_version,
        "recu_version": packed.recu_version,
        "tau": packed.tau,
        "recipe": packed.recipe.to_dict(),
        "storage": packed.storage,
        "entropy_unit": "bits",
        "layers": packed.stats,
        "totals": totals(packed.stats),
        "training": packed.training,
        "history": packed.history,
        "compare": None,
    }
    if compare is not None:
        result["compare"] = compare_files(pack.read(compare), packed)
    return result


def compare_files(old: pack.PackedFile, new: pack.PackedFile) -> dict[str, Any]:
    """Sign-flip rates from `old` to `new`, per layer and pooled.

    Tail/core split: tail = dead (|W1| > Q) in OLD, which needs OLD's latent weights;
    without them those rates are None ("n/a").
    """
    old_layers = {e["name"]: e["shape"] for e in old.layers}
    new_layers = {e["name"]: e["shape"] for e in new.layers}
    if old_layers != new_layers:
        differ = sorted(set(old_layers) ^ set(new_layers)) or [
            n for n in new_layers if old_layers[n] != new_layers[n]
        ]
        raise RecuError(
            f"{old.path} and {new.path} hold different models (binary layers differ: "
            f"{', '.join(differ[:3])}); compare two checkpoints of the same model"
        )
    old_signs, new_signs = pack.read_signs(old), pack.read_signs(new)
    tails = None
    if old.has_latent:
        tails = {n: layer.dead_mask() for n, layer in pack.latent_layers(old).items()}
    layers, pooled = [], {}
    for name in new_layers:
        c = flip_counts(old_signs[name], new_signs[name], tails[name] if tails else None)
        layers.append({"name": name, **rates_from_counts(c), **c})
        for k, v in c.items():
            pooled[k] = pooled.get(k, 0) + v
    return {
        "old": str(old.path),
        "new": str(new.path),
        "tail_from": str(old.path) if tails else None,
        "layers": layers,
        "totals": {**rates_from_counts(pooled), **pooled},
    }


# ---------------------------------------------------------------- rendering


def _pct(x: Any, digits: int = 1) -> str:
    return "n/a" if not isinstance(x, (int, float)) else f"{100.0 * x:.{digits}f}"


def _num(x: Any, fmt: str = ".3f") -> str:
    return "n/a" if not isinstance(x, (int, float)) else format(x, fmt)


def _q(x: Any) -> str:
    return "inf" if x is None else _num(x)


def render_analysis(console: Console, result: dict[str, Any], hist_layers: int = 2) -> None:
    """Header, per-layer table with totals, histograms of the worst/best layers, history."""
    storage = result.get("storage") or {}
    console.print(
        Text.assemble(
            (str(result["file"]), "bold"),
            f": {result['model']}, tau at save {_num(result.get('tau'))}, format "
            f"v{result['format_version']} (recu {result['recu_version']}), floats "
            f"{storage.get('float_dtype', '?')}, latent weights "
            f"{'stored' if storage.get('latent') else 'not stored'}",
        )
    )
    table, hidden = fitted_table(
        _layer_columns(result), console.width, "binary layers (entropies in bits; dead = |W1| > Q)"
    )
    console.print(table)
    if hidden:
        console.print(
            Text(
                f"not shown at this width: {', '.join(hidden)} (widen the terminal or --json)",
                style="dim",
            )
        )
    layers = result["layers"]
    if layers and hist_layers > 0:
        ranked = sorted(layers, key=lambda s: s.get("dead_share") or 0.0, reverse=True)
        worst = ranked[:hist_layers]
        chosen = worst + [s for s in ranked[-hist_layers:] if s not in worst]
        for i, s in enumerate(chosen):
            tag = "most dead" if i < hist_layers else "least dead"
            for line in histogram_lines(s, tag, width=max(30, min(101, console.width - 4))):
                console.print(line)
    if result.get("history"):
        console.print(_history_table(result["history"]))


def _layer_columns(result: dict[str, Any]) -> list[Column]:
    """The analyze table as columns; priority decides what a narrow terminal drops first."""
    layers = result["layers"]
    tot = result["totals"]

    def col(header: str, fn, priority: int, footer: str = "", justify: str = "right") -> Column:
        return Column(header, [fn(s) for s in layers], justify, footer, priority)

    def per_b2(key: str):
        def cell(s: dict[str, Any]) -> str:
            b = s.get("b_hat")
            b2 = b * b if _isnum(b) else 0.0  # 0 also when a tiny b_hat underflows
            return _num(s[key] / b2) if b2 > 0 and _isnum(s.get(key)) else "n/a"

        return cell

    cols = [
        col("layer", lambda s: str(s["name"]), 100, "total", "left"),
        col("weights", lambda s: _int(s.get("weights")), 1, _int(tot["weights"])),
        col("tau", lambda s: _num(s.get("tau")), 4),
        col("b_hat", lambda s: _num(s.get("b_hat")), 5),
        col("Q", lambda s: _q(s.get("q")), 8),
        col("|beta|", lambda s: _num(s.get("act_threshold_abs_mean")), 2),
        col("dead %", lambda s: _pct(s.get("dead_share")), 10, _pct(tot["dead_share"])),
        col("+1 %", lambda s: _pct(s.get("plus_share")), 6, _pct(tot["plus_share"])),
        col("H", lambda s: _num(s.get("entropy_bits")), 9, _num(tot["entropy_bits"])),
        col("H ch min", lambda s: _num(s.get("entropy_ch_min_bits")), 3),
        col("QE/b²", lambda s: _num(s.get("qe_over_b2")), 7, _num(tot["qe_over_b2"])),
        col("closed", per_b2("qe_closed"), 2),
        col("paper", per_b2("qe_closed_paper"), 0),
    ]
    compare = result.get("compare")
    if compare:
        flips = {e["name"]: e for e in compare["layers"]}
        ct = compare["totals"]
        for header, key, prio in (
            ("flip %", "overall", 9),
            ("tail %", "tail", 8),
            ("core %", "core", 8),
        ):
            cols.append(
                col(
                    header,
                    lambda s, k=key: _pct(flips.get(s["name"], {}).get(k), 2),
                    prio,
                    _pct(ct[key], 2),
                )
            )
    return cols


def _int(x: Any) -> str:
    return f"{x:,}" if _isnum(x) else "n/a"


def _isnum(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def histogram_lines(s: dict[str, Any], tag: str, width: int = 80, height: int = 4) -> list[Text]:
    """A unicode bar histogram of W1 (linear counts), dead tails in red, +-Q marked below."""
    h = s.get("hist") or {}
    counts = h.get("counts") or []
    r = h.get("range")
    if not counts or not _isnum(r):
        return [Text(f"{s['name']}: no histogram stored")]
    nb = len(counts)
    per = -(-nb // max(1, width))  # bins per column: equal for all, no aliasing spikes
    groups = [counts[i : i + per] for i in range(0, nb, per)]
    cols = [sum(g) / len(g) for g in groups]
    width = len(cols)
    step = 2 * r / nb

    def column(x: float) -> int:
        return max(0, min(width - 1, int((x + r) / step) // per))

    centers = [-r + (j * per + len(g) / 2) * step for j, g in enumerate(groups)]
    top = max(cols) or 1
    q = s.get("q")
    dead = [q is not None and abs(x) > q for x in centers]
    title = Text.assemble(
        (f"{s['name']}", "bold"),
        f"  ({tag}: dead {_pct(s.get('dead_share'))}%, Q {_q(q)}, b_hat {_num(s.get('b_hat'))}, "
        f"range +-{r:.2f}",
        (
            f", {h.get('below', 0) + h.get('above', 0)} beyond"
            if h.get("below") or h.get("above")
            else ""
        ),
        ")",
    )
    lines = [title]
    levels = len(BLOCKS) - 1
    for row in range(height - 1, -1, -1):
        line = Text()
        for j, c in enumerate(cols):
            fill = c / top * height * levels - row * levels
            ch = BLOCKS[max(0, min(levels, round(fill)))] if fill > 0 else " "
            if c and row == 0 and ch == " ":
                ch = BLOCKS[1]  # a non-empty bin is never invisible
            line.append(ch, style="red" if dead[j] else "cyan")
        lines.append(line)
    marks = [" "] * width
    marks[column(0.0)] = "0"
    if q is not None and q < r:
        for x in (-q, q):
            marks[column(x)] = "|"
    axis = Text("".join(marks), style="dim")
    lines.append(axis)
    return lines


def _history_table(history: list[dict[str, Any]]) -> Table:
    keys: list[str] = []
    for h in history:
        for k, v in h.items():
            if k not in keys and (_isnum(v) or isinstance(v, str)) and len(keys) < 10:
                keys.append(k)
    t = Table(title="training history (per epoch)", header_style="bold")
    for k in keys:
        t.add_column(str(k)[:16], justify="right")
    for h in history[-20:]:
        t.add_row(*[_cell(h.get(k)) for k in keys])
    return t


def _cell(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v) if v is not None else ""
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)[:24]
