"""`recu export`: a packed checkpoint as ONNX, QONNX or a torch.export program, self-verified.

Targets (docs/deploy.md): standard ONNX (onnxruntime, OpenVINO, ...), QONNX (FINN, hls4ml;
run by the `qonnx` package), and pt2 (torch.export of the xnor runtime, for libtorch /
AOTInductor). Each export is written to a temporary file, run in its target runtime on a
batch (real images with data=..., else random), compared with recu's own logits, and only
then renamed into place; see verify.py for what must agree.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from recu_cli.atomic import atomic_path, check_target
from recu_cli.errors import RecuError

FORMATS = ("onnx", "qonnx", "pt2")
SUFFIXES = {".onnx": "onnx", ".pt2": "pt2"}
# what each format's file is (QONNX is ONNX): a suffix naming another kind is refused
CONTAINER = {"onnx": "an ONNX model", "qonnx": "an ONNX model", "pt2": "a torch.export program"}
SUFFIX_OF = {"onnx": ".onnx", "qonnx": ".onnx", "pt2": ".pt2"}
# the Python modules each format needs (to write, and to run the check), with their PyPI names
NEEDS = {
    "onnx": (("onnx", "onnx"), ("onnxruntime", "onnxruntime")),
    "qonnx": (("onnx", "onnx"), ("onnxruntime", "onnxruntime"), ("qonnx", "qonnx")),
    "pt2": (),
}
INSTALL_HINT = 'pip install "recu[export]" (in a checkout: pip install -e ".[export]")'
DEFAULT_BATCH = 32


@dataclass
class ExportResult:
    """What was written and how it was checked."""

    path: str
    format: str
    bytes: int
    source: str
    source_bytes: int
    opset: int | None
    packed: bool
    checks: list[Any] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "format": self.format,
            "bytes": self.bytes,
            "source": self.source,
            "source_bytes": self.source_bytes,
            "size_ratio": self.bytes / self.source_bytes if self.source_bytes else None,
            "opset": self.opset,
            "packed": self.packed,
            "checks": [c.to_dict() for c in self.checks],
            "notes": self.notes,
        }


def resolve_format(fmt: str | None, out: Path) -> str:
    """--format, or the output's suffix (.onnx -> onnx, .pt2 -> pt2)."""
    if fmt is None:
        guess = SUFFIXES.get(out.suffix.lower())
        if guess is None:
            raise RecuError(
                f"cannot tell the format from {out.name!r}; pass --format "
                f"({', '.join(FORMATS)}) or name the output .onnx / .pt2"
            )
        return guess
    key = fmt.lower()
    if key not in FORMATS:
        raise RecuError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    named = SUFFIXES.get(out.suffix.lower())
    if named is not None and CONTAINER[named] != CONTAINER[key]:
        raise RecuError(
            f"--format {key} writes {CONTAINER[key]}, but {out.name!r} names {CONTAINER[named]}; "
            f"name the output {out.with_suffix(SUFFIX_OF[key]).name} (or drop --format)"
        )
    return key


def check_extras(fmt: str) -> None:
    """One line naming the missing package and the install command (exit code 1)."""
    missing = []
    for module, dist in NEEDS[fmt]:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(dist)
    if missing:
        raise RecuError(
            f"--format {fmt} needs {', '.join(missing)}, which is not installed; {INSTALL_HINT}",
            exit_code=1,
        )


def check_output(out: Path, src: Path) -> None:
    """The output must go into an existing folder, not over the source or a folder."""
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise RecuError(f"output folder {parent} does not exist; create it first")
    if out.is_dir():
        raise RecuError(f"{out} is a folder; give a file name, e.g. {out / 'model.onnx'}")
    check_target(out)
    if out.exists() and src.exists() and out.resolve() == src.resolve():
        raise RecuError(f"{out} is the checkpoint being exported; choose another output name")


def export_file(
    src: Path,
    out: Path,
    fmt: str | None = None,
    *,
    packed: bool = False,
    alpha_in_quant: bool = False,
    data: str | None = None,
    batch: int = DEFAULT_BATCH,
    seed: int = 0,
    exact_rounding: bool = False,
) -> ExportResult:
    """Export a packed checkpoint, verify the written bytes, then move them into place."""
    fmt = resolve_format(fmt, out)
    if packed and fmt != "onnx":
        raise RecuError("--packed applies to --format onnx (QONNX and pt2 store weights their way)")
    if alpha_in_quant and fmt != "qonnx":
        raise RecuError("--alpha-in-quant applies to --format qonnx only")
    if batch < 1:
        raise RecuError(f"--verify-batch must be at least 1, got {batch}")
    if exact_rounding and fmt == "pt2":
        raise RecuError("--exact-rounding applies to onnx and qonnx (pt2 runs recu's own ops)")
    check_output(out, src)
    check_extras(fmt)
    from recu_cli.pack import load, read_spec
    from recu_cli.spec import check_batch

    spec = read_spec(src)
    check_batch(batch, spec.input_size, "--verify-batch")  # before anything is allocated
    model = load(src)
    x, inputs = _batch(spec, data, batch, seed)
    with torch.no_grad():
        ref = model(x)
    result = ExportResult(str(out), fmt, 0, str(src), src.stat().st_size, None, packed)
    with atomic_path(out) as tmp:
        if fmt == "pt2":
            _pt2(model, spec, tmp, x, ref, inputs, result)
        else:
            _onnx(model, spec, fmt, tmp, x, ref, inputs, result, packed, alpha_in_quant,
                  exact_rounding)  # fmt: skip
        result.bytes = tmp.stat().st_size
    return result


def _batch(spec: Any, data: str | None, n: int, seed: int) -> tuple[torch.Tensor, str]:
    from recu_cli.export.verify import make_batch

    return make_batch(spec, data, n, seed)


def _onnx(
    model: Any,
    spec: Any,
    fmt: str,
    tmp: Path,
    x: torch.Tensor,
    ref: torch.Tensor,
    inputs: str,
    result: ExportResult,
    packed: bool,
    alpha_in_quant: bool,
    exact_rounding: bool,
) -> None:
    import onnx

    from recu_cli.export import exact, onnx_graph, verify

    if fmt == "onnx":
        proto = onnx_graph.build_model(model, spec, onnx_graph.BinaryConvWriter(packed), fmt="onnx")
    else:
        from recu_cli.export import qonnx

        proto = qonnx.build(model, spec, alpha_in_quant)
    if exact_rounding:
        _exact_note(exact.exact_float_layers(proto), result)
    else:
        result.notes.append(PLAIN_NOTE)
    onnx_graph.check(proto)
    onnx.save(proto, str(tmp))
    onnx_graph.check(onnx.load(str(tmp)))  # what was written, not only what was built
    result.opset = onnx_graph.OPSET
    xs = x.numpy()
    if fmt == "onnx":
        ort = f"onnxruntime {verify.version('onnxruntime')}"
        exact_out = verify.run_onnxruntime(tmp, xs, exact=True)
        exact = verify.compare(ref, exact_out, f"{ort} (weight-folding fusions off)", inputs)
        default_out = verify.run_onnxruntime(tmp, xs, exact=False)
        default = verify.compare(
            ref, default_out, f"{ort} (default optimizations)", inputs, required="none"
        )
        result.checks += [exact, default]
        result.notes.append(
            "onnxruntime checked twice: with disabled_optimizers="
            f"{list(verify.ORT_INEXACT_FUSIONS)} and with its default optimizations"
        )
        verify.enforce(exact)
    else:
        from recu_cli.export import qonnx

        required = "argmax" if alpha_in_quant else "argmax+tolerance"
        check = verify.compare(ref, qonnx.run(tmp, xs),
                               f"qonnx {verify.version('qonnx')} executor after cleanup", inputs,
                               required=required)  # fmt: skip
        result.checks.append(check)
        verify.enforce(check)


PLAIN_NOTE = (
    "float layers as plain Conv/BatchNormalization nodes: they round differently from PyTorch "
    "in the last bit, which flips a sign now and then (about 1 image in 200 moves on trained "
    "checkpoints); --exact-rounding reproduces recu's bits (docs/deploy.md)"
)


def _exact_note(counts: dict[str, int], result: ExportResult) -> None:
    """What exact.exact_float_layers rewrote, for the report."""
    what = ", ".join(f"{n} {k}" for k, n in counts.items() if n and k != "fp Conv kept")
    kept = counts.get("fp Conv kept", 0)
    result.notes.append(
        f"float layers written to round like PyTorch (float64 fma emulation): {what or 'none'}"
        + (
            f"; {kept} fp Conv node(s) kept as Conv (do not round like PyTorch's; docs/deploy.md)"
            if kept
            else ""
        )
    )


def _pt2(
    model: Any,
    spec: Any,
    tmp: Path,
    x: torch.Tensor,
    ref: torch.Tensor,
    inputs: str,
    result: ExportResult,
) -> None:
    from recu_cli.export import onnx_graph, pt2, verify

    rt = pt2.runtime_model(model)
    with torch.no_grad():
        rt_out = rt(x)
    ep = pt2.export(rt, spec)
    ops = ",".join(pt2.custom_ops(ep))
    meta = onnx_graph.metadata(spec, "pt2", False, {"recu.custom_ops": ops})
    pt2.save(ep, tmp, meta)
    loaded, _ = pt2.load(tmp)
    with torch.no_grad():
        out = loaded.module()(x)
    exact = verify.compare(rt_out, out, f"torch.export program (torch {torch.__version__}) vs "
                           "recu's xnor runtime", inputs, required="bit-identical")  # fmt: skip
    vs_float = verify.compare(ref, out, "torch.export program vs recu's float deploy model",
                              inputs)  # fmt: skip
    result.checks += [exact, vs_float]
    verify.enforce(exact)
    verify.enforce(vs_float)
