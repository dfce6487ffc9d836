"""torch.export program of the xnor runtime model (`recu export --format pt2`).

The runtime model (recu_cli.runtime.to_runtime(model, "xnor")) is traced by torch.export:
the binary convs become `torch.ops.recu_xnor.conv` nodes (TORCH_LIBRARY custom ops with
the fake kernels of recu_cli/runtime/ext.py), with their packed weights, zero-padding
tables and folded epilogues as constants; the float glue (stem, shortcuts, pooling,
classifier) stays ATen. The batch axis is dynamic; the image size is the model's.

Loading needs the recu_xnor ops registered first: `import recu_cli.runtime` (which loads
the cached kernel library) before `torch.export.load`, or `load(path)` below.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from recu_cli.errors import RecuError
from recu_cli.spec import ModelSpec

META_FILE = "recu_meta.json"
MAX_BATCH = 65536


def runtime_model(model: nn.Module) -> nn.Module:
    """The xnor runtime copy of a deploy model (RecuError when the kernels cannot build)."""
    from recu_cli.runtime import to_runtime

    return to_runtime(model, "xnor")


def export(rt: nn.Module, spec: ModelSpec) -> Any:
    """torch.export.ExportedProgram of a runtime model, with a dynamic batch axis."""
    c, h, w = spec.input_size
    example = torch.zeros(2, c, h, w)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    try:
        with torch.no_grad():
            return torch.export.export(rt, (example,), dynamic_shapes=({0: batch},), strict=False)
    except Exception as e:  # noqa: BLE001 - export raises many types; keep its first line
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise RecuError(f"torch.export failed on the runtime model ({first})", exit_code=1) from e


def save(ep: Any, path: Path, meta: dict[str, str]) -> None:
    """torch.export.save with recu's metadata (input, normalisation) as an extra file.

    Written through a buffer: torch wants a `.pt2` name, and the atomic writer's temporary
    file is `NAME.pt2.<pid>.tmp`.
    """
    buf = io.BytesIO()
    torch.export.save(ep, buf, extra_files={META_FILE: json.dumps(meta, indent=2)})
    path.write_bytes(buf.getvalue())


def load(path: Path) -> tuple[Any, dict[str, str]]:
    """(ExportedProgram, metadata); registers the recu_xnor ops first (builds if needed)."""
    from recu_cli.runtime import ext

    ext.ops()
    extra = {META_FILE: ""}
    ep = torch.export.load(io.BytesIO(Path(path).read_bytes()), extra_files=extra)
    return ep, json.loads(extra[META_FILE] or "{}")


def custom_ops(ep: Any) -> list[str]:
    """Names of the non-ATen ops in the program (the recu_xnor kernels)."""
    names = {
        str(n.target)
        for n in ep.graph.nodes
        if n.op == "call_function" and str(n.target).startswith("recu_xnor.")
    }
    return sorted(names)
