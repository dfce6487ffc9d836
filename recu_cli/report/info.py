"""`recu info`: a Larq-style summary computed from the file itself.

Parameter counts and bytes come from the safetensors header (real bytes on disk, not a
model's idea of them); each module's class, output size and MACs (for BOPs/FLOPs) from the
file's metadata 'modules' (docs/format.md section 4.2), written with it. Files without
those records (older ones), or whose checksum does not match, get them from one forward
of the module tree rebuilt from the recipe on the meta device, which also checks their
tensors against it: the only path that imports torch. Conventions: 1 MAC = 1 FLOP (or
1 BOP for a binary conv), as in Bi-Real/ReActNet/ReCU; OPs = BOPs / 64 + FLOPs; BN,
activations and the alpha scaling are not counted.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from recu_cli.report.fit import Column, fitted_table

if TYPE_CHECKING:
    from recu_cli.pack import PackedFile, TensorInfo


def summarize(path: str | Path) -> dict[str, Any]:
    """Per-module and total sizes and compute of a packed file, JSON-ready."""
    from recu_cli import pack

    packed, header = pack.parse(Path(path), known=None)
    if packed.modules is not None and pack.checksum_matches(packed, header):
        records = packed.modules
    else:
        packed, records = _rebuilt_records(path)
    binary = {e["name"]: e for e in packed.layers}
    by_owner: dict[str, list[TensorInfo]] = {}
    for info in packed.tensors.values():
        by_owner.setdefault(info.name.rpartition(".")[0], []).append(info)
    rows = [_row(r, by_owner[r["name"]], binary.get(r["name"])) for r in records]
    computed = any(r["output"] is not None for r in records)
    t = _totals(packed, rows, computed)
    return {
        "file": str(packed.path),
        "model": packed.spec.full_name,
        "input_size": list(packed.spec.input_size),
        "num_classes": packed.spec.num_classes,
        "tau": packed.tau,
        "act_threshold": packed.recipe.act_threshold,
        "format_version": packed.format_version,
        "storage": packed.storage,
        "layers": rows,
        "totals": t,
    }


def _rebuilt_records(path: str | Path) -> tuple[PackedFile, list[dict[str, Any]]]:
    """The module records of the tree the recipe builds, after checking the file fully
    against it (model name, tensors, checksum last: damage of a known kind gets its own
    message)."""
    from recu_cli import pack

    packed = pack.read(path, verify=False, checksum=False)
    model = pack.skeleton(packed)
    pack.check_against_recipe(packed, model)
    pack.verify_checksum(packed)
    return packed, pack.module_records(model, packed.spec.input_size, packed.tensors)


def _row(
    record: dict[str, Any], tensors: list[TensorInfo], entry: dict[str, Any] | None
) -> dict[str, Any]:
    from recu_cli.pack import BITS_SUFFIX, FLOAT_DTYPES, LATENT_SUFFIX

    name = record["name"]
    latent = [t for t in tensors if entry is not None and t.name == name + LATENT_SUFFIX]
    stored = [t for t in tensors if t not in latent]
    bits = [t for t in stored if t.name.endswith(BITS_SUFFIX)]
    floats = [t for t in stored if t.dtype in FLOAT_DTYPES]
    macs = record["macs"]
    return {
        "name": name or "(root)",
        "type": record["type"],
        "output": record["output"],
        "binary_params": math.prod(entry["shape"]) if entry is not None else 0,
        "binary_bytes": sum(t.nbytes for t in bits),
        "fp_values": sum(t.numel for t in floats),
        "fp_bytes": sum(t.nbytes for t in floats),
        "other_bytes": sum(t.nbytes for t in stored if t not in bits and t not in floats),
        "bytes": sum(t.nbytes for t in stored),
        "latent_bytes": sum(t.nbytes for t in latent),
        "bops": macs if entry is not None else 0,
        "flops": macs if entry is None else 0,
    }


def _totals(packed: PackedFile, rows: list[dict[str, Any]], compute: bool) -> dict[str, Any]:
    def total(key: str) -> int:
        return sum(int(r[key] or 0) for r in rows)

    binary, fp = total("binary_params"), total("fp_values")
    f32 = 4 * (binary + fp)
    bops, flops = (total("bops"), total("flops")) if compute else (None, None)
    ops = bops / 64 + flops if compute else None
    return {
        "file_bytes": packed.file_bytes,
        "header_bytes": packed.header_bytes,
        "binary_weights": binary,
        "binary_bytes": total("binary_bytes"),
        "bits_per_binary_weight": 8 * total("binary_bytes") / binary if binary else None,
        "full_precision_values": fp,
        "full_precision_bytes": total("fp_bytes"),
        "other_bytes": total("other_bytes"),
        "latent_bytes": total("latent_bytes"),
        "deploy_bytes": packed.file_bytes - total("latent_bytes"),
        "float32_bytes": f32,
        "compression": f32 / packed.file_bytes,
        "deploy_compression": f32 / (packed.file_bytes - total("latent_bytes")),
        "binary_param_share": binary / (binary + fp) if binary + fp else None,
        "bops": bops,
        "flops": flops,
        "ops": ops,
        "binary_mac_share": bops / (bops + flops) if compute and bops + flops else None,
        "binary_ops_share": bops / 64 / ops if compute and ops else None,
    }


def _mb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 1e6:.2f} MB"


def _g(n: float | None) -> str:
    """Giga above 1e8, mega below: a CIFAR model's 0.4 M FLOPs must not print as 0.000 G."""
    if n is None:
        return "n/a"
    return f"{n / 1e9:.3f} G" if n >= 1e8 else f"{n / 1e6:.3f} M"


def render_info(console: Console, s: dict[str, Any]) -> None:
    """Per-module table, then the totals."""
    rows = s["layers"]

    def col(header: str, fn, priority: int, justify: str = "right") -> Column:
        return Column(header, [fn(r) for r in rows], justify, "", priority)

    cols = [
        col("layer", lambda r: r["name"], 100, "left"),
        col("type", lambda r: r["type"], 6, "left"),
        col("output", lambda r: "x".join(map(str, r["output"])) if r["output"] else "", 1, "left"),
        col("1-bit", lambda r: f"{r['binary_params']:,}" if r["binary_params"] else "", 9),
        col("fp values", lambda r: f"{r['fp_values']:,}" if r["fp_values"] else "", 8),
        col("bytes", lambda r: f"{r['bytes']:,}", 10),
        col("BOPs", lambda r: f"{r['bops']:,}" if r["bops"] else "", 3),
        col("FLOPs", lambda r: f"{r['flops']:,}" if r["flops"] else "", 2),
    ]
    size = "x".join(map(str, s["input_size"]))
    t, hidden = fitted_table(
        cols,
        console.width,
        f"{s['model']} from {s['file']} (input {size}; bytes = tensor data on disk)",
    )
    console.print(t)
    if hidden:
        console.print(
            Text(f"not shown at this width: {', '.join(hidden)} (or use --json)", style="dim")
        )
    tot = s["totals"]
    summary = Table(title="totals", show_header=False)
    summary.add_column(style="bold")
    summary.add_column(justify="right")
    pairs = [
        ("file size", f"{tot['file_bytes']:,} bytes ({_mb(tot['file_bytes'])})"),
        ("  header + metadata", f"{tot['header_bytes']:,} bytes"),
        (
            "  binary weights",
            f"{tot['binary_weights']:,} in {tot['binary_bytes']:,} bytes "
            f"({_bits(tot['bits_per_binary_weight'])} bits each)",
        ),
        (
            "  full-precision values",
            f"{tot['full_precision_values']:,} in {tot['full_precision_bytes']:,} bytes",
        ),
    ]
    if tot["latent_bytes"]:
        pairs.append(
            (
                "  latent weights (fp32)",
                f"{tot['latent_bytes']:,} bytes; without them {_mb(tot['deploy_bytes'])}",
            )
        )
    pairs += [
        ("activation thresholds", _threshold_text(s.get("act_threshold", "zero"))),
        ("float32 equivalent", _mb(tot["float32_bytes"])),
        (
            "compression",
            f"{tot['compression']:.1f}x"
            + (
                f" ({tot['deploy_compression']:.1f}x without latents)"
                if tot["latent_bytes"]
                else ""
            ),
        ),
        ("binary share of params", _share(tot["binary_param_share"])),
        ("BOPs (binary MACs)", _g(tot["bops"])),
        ("FLOPs (full-precision MACs)", _g(tot["flops"])),
        ("OPs = BOPs/64 + FLOPs", _g(tot["ops"])),
        ("binary share of MACs", _share(tot["binary_mac_share"])),
        ("binary share of OPs", _share(tot["binary_ops_share"])),
    ]
    for k, v in pairs:
        summary.add_row(k, v)
    console.print(summary)


def _threshold_text(mode: str) -> str:
    if mode == "zero":
        return "none: sign(x) (the paper)"
    return f"sign(x - beta), one fp32 beta per input channel ({mode})"


def _bits(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _share(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"
