"""`save`: a training-form model -> packed file, atomically (docs/format.md sections 2-4).

The caller brings the statistics the file stores (`recu_cli.stats.model_stats(model)`):
the format records them, the statistics module computes them."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from recu_cli import __version__
from recu_cli.atomic import atomic_path
from recu_cli.binarize.layers import ReCUConv2d
from recu_cli.bnn import binary_layers
from recu_cli.convert_config import ConvertConfig
from recu_cli.errors import RecuError
from recu_cli.pack import schema as s
from recu_cli.pack.bits import pack_signs
from recu_cli.pack.rebuild import build_tree, module_records
from recu_cli.pack.validate import parse_modules
from recu_cli.spec import ModelSpec


def save(
    path: str | Path,
    model: nn.Module,
    spec: ModelSpec,
    config: ConvertConfig,
    *,
    stats: list[dict[str, Any]],
    half: bool = False,
    keep_latent: bool = False,
    training: dict | None = None,
    history: list[dict] | None = None,
) -> dict[str, Any]:
    """Write `model` (training form, with ReCUConv2d layers) as a packed file, atomically.

    `stats`: one `LayerStats` dict per binary layer, with its name first, in module order
    (`recu_cli.stats.model_stats(model)`). Returns a summary: bytes on disk, binary
    weights, full-precision values and more.
    """
    path = Path(path)
    layers = binary_layers(model)
    if [x.get("name") for x in stats] != [n for n, _ in layers]:
        raise ValueError("stats must list the model's binary layers in order (model_stats)")
    owners = {n for n, _ in layers}
    tensors: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, layer in layers:
            roles = s.layer_roles(
                bias=layer.bias is not None,
                threshold=layer.act_threshold is not None,
                latent=keep_latent,
            )
            for role in roles:
                tensors[s.tensor_name(name, role)] = _role_tensor(layer, role, half)
        for key, value in model.state_dict().items():
            if s.owner(key) not in owners:
                tensors[key] = _stored(value, half)
    entries = [_layer_entry(n, m).to_dict() for n, m in layers]
    first_float = next((t.dtype for t in tensors.values() if t.is_floating_point()), None)
    float_dtype = "F16" if half else _dtype_name(first_float or torch.float32)
    metadata = {
        s.FORMAT: s.MAGIC,
        s.VERSION: str(s.FORMAT_VERSION),
        s.RECU_VERSION: __version__,
        s.MODEL: _json(spec.to_dict()),
        s.RECIPE: _json(config.to_dict()),
        s.ENCODING_KEY: _json(s.ENCODING),
        s.LAYERS: _json(entries),
        s.TAU: _json(_common_tau(layers)),
        s.STORAGE: _json({"float_dtype": float_dtype, "latent": bool(keep_latent)}),
        s.STATS: _json(stats),
        s.TRAINING: _json(training),
        s.HISTORY: _json(history),
        **_module_metadata(path, spec, config, tensors, entries),
    }
    _write_atomic(path, tensors, metadata)
    return _summary(path, tensors, layers, half=half, keep_latent=keep_latent)


def _role_tensor(layer: ReCUConv2d, role: str, half: bool) -> torch.Tensor:
    """What a binary layer stores for `role` (schema.layer_roles)."""
    if role == s.BITS:
        return pack_signs(layer.binary_weight())
    if role == s.ALPHA:
        return _stored(layer.effective_alpha(), half)
    if role == s.BIAS:
        return _stored(layer.bias, half)
    if role == s.THRESHOLD:  # fp32 always: it decides signs exactly
        return _stored(layer.act_threshold, False)
    return layer.weight.detach().float().cpu().contiguous().clone()  # LATENT


def _summary(
    path: Path,
    tensors: dict[str, torch.Tensor],
    layers: list[tuple[str, ReCUConv2d]],
    *,
    half: bool,
    keep_latent: bool,
) -> dict[str, Any]:
    binary = sum(math.prod(m.weight.shape) for _, m in layers)
    bits_bytes = sum(t.numel() for k, t in tensors.items() if k.endswith(s.BITS_SUFFIX))
    latent = (
        sum(tensors[s.tensor_name(n, s.LATENT)].numel() for n, _ in layers) if keep_latent else 0
    )
    fp = [t for t in tensors.values() if t.is_floating_point()]
    return {
        "path": str(path),
        "bytes": path.stat().st_size,
        "binary_weights": binary,
        "binary_bytes": bits_bytes,
        "full_precision_values": sum(t.numel() for t in fp) - latent,
        "full_precision_bytes": sum(t.numel() * t.element_size() for t in fp) - 4 * latent,
        "latent_values": latent,
        "binary_layers": len(layers),
        "half": bool(half),
        "keep_latent": bool(keep_latent),
    }


def _json(obj: Any) -> str:
    """Strict JSON (no NaN/Infinity, which other languages reject): non-finite -> null."""
    return json.dumps(_finite(obj), separators=(",", ":"), allow_nan=False, default=_default)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:
        return _finite(obj.item())
    return obj


def _default(o: Any) -> Any:
    if isinstance(o, (set, frozenset)):
        return sorted(o, key=str)
    return str(o)  # Path and anything else a caller put in training/history


def _stored(t: torch.Tensor, half: bool) -> torch.Tensor:
    t = t.detach().cpu()
    if half and t.is_floating_point():
        t = t.half()
    return t.contiguous().clone()


def _layer_entry(name: str, layer: ReCUConv2d) -> s.LayerEntry:
    shape = list(layer.weight.shape)
    per_row = math.prod(shape[1:])
    return s.LayerEntry(
        name=name,
        shape=shape,
        stride=list(layer.stride),
        padding=list(layer.padding),
        dilation=list(layer.dilation),
        groups=int(layer.groups),
        bias=layer.bias is not None,
        bits_per_row=per_row,
        bytes_per_row=s.bytes_per_row(per_row),
        tau=float(layer.tau),
        alpha_mode=layer.alpha_mode,
    )


def _module_metadata(
    path: Path,
    spec: ModelSpec,
    config: ConvertConfig,
    tensors: dict[str, torch.Tensor],
    layers: list[dict[str, Any]],
) -> dict[str, str]:
    """Metadata 'modules' and the minor version that announces it, from the tree that
    `load` rebuilds (on the meta device: no memory, no compute), so `recu info` prints
    them without torch. Checked by the reader's own validator: nothing when the spec and
    recipe build no tree, or another one than `model` (the file then fails to load as
    well, with that error)."""
    try:
        tree = build_tree(spec, config, "meta", path)
        records = module_records(tree, spec.input_size, tensors)
        parse_modules(path, records, layers, tensors)
    except RecuError:
        return {}
    return {s.MINOR: str(s.FORMAT_MINOR), s.MODULES: _json(records)}


def _common_tau(layers: list[tuple[str, ReCUConv2d]]) -> float | None:
    taus = {float(m.tau) for _, m in layers}
    return taus.pop() if len(taus) == 1 else None


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}.get(dtype, "F32")


def _write_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Create the folder, then write through `atomic_path` (temp file, fsync, rename),
    with the checksum of header and tensor data in the metadata."""
    from safetensors.torch import save as serialize

    from recu_cli.checksum import with_checksum

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RecuError(
            f"cannot create folder {path.parent} ({e.strerror}); pick another output path"
        ) from e
    try:
        blob = with_checksum(serialize, tensors, metadata)
        with atomic_path(path) as tmp:
            tmp.write_bytes(blob)
    except OSError as e:
        raise RecuError(
            f"cannot write {path} ({e.strerror or e}); check space and permissions", exit_code=1
        ) from e
