"""The packed checkpoint: 1 bit per binary weight in a safetensors file (spec: docs/format.md).

Write (`save`), read without building the model (`read`, `read_spec`, `read_signs`),
rebuild the deploy model (`load`). Everything read from a file is validated before use and
every problem becomes one RecuError line; nothing is unpickled, imported or evaluated, and
the model name is only checked against the registries (`recu_cli.models.is_known`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from recu_cli import __version__
from recu_cli.atomic import atomic_path
from recu_cli.binarize.layers import ReCUConv2d
from recu_cli.convert import ConvertConfig, binary_layers, convert_model, to_deploy
from recu_cli.errors import RecuError
from recu_cli.models import ModelSpec, create_model, few, is_known

MAGIC = "recu-packed"
FORMAT_VERSION = 2  # 2: optional <layer>.act_threshold tensors (version 1 files still load)
# metadata "checksum" (checksum.py) is optional within version 2, so older readers still
# read new files; a file without one loads with a note
BITS_SUFFIX = ".weight_bits"
LATENT_SUFFIX = ".weight"
PLAIN_FORMATS = ("pt", "tf", "flax", "np", "mlx", "paddle")  # what other writers put there
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
ENCODING = {
    "values": "sign(W2) = sign(clamp(W1, -Q, Q)) = sign(W - per-filter mean), in {-1, +1}",
    "flatten": "OIHW",
    "pack_axis": 1,
    "bit_order": "msb-first",
    "bit_one": 1,
    "bit_zero": -1,
    "pad_bits": 0,
    "sign_zero": 1,
    "activation_sign_zero": 1,
    "conv_padding": "zeros",
}
DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
INT_DTYPES = {"I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64"}


# ---------------------------------------------------------------- bits


def pack_signs(sign: torch.Tensor) -> torch.Tensor:
    """+-1 weights [O, I, kh, kw] -> U8 [O, ceil(I*kh*kw / 8)]: 1 = +1, MSB first, pad 0."""
    bits = (sign.detach() >= 0).reshape(sign.shape[0], -1).cpu().numpy().astype(np.uint8)
    return torch.from_numpy(np.packbits(bits, axis=1, bitorder="big"))


def unpack_signs(packed: torch.Tensor, shape: tuple[int, ...] | list[int]) -> torch.Tensor:
    """Inverse of `pack_signs`: U8 rows -> float32 +-1 of `shape`; padding bits must be 0."""
    per_row = math.prod(shape[1:])
    arr = packed.cpu().numpy()
    if per_row % 8:
        spare = (1 << (8 - per_row % 8)) - 1
        if np.any(arr[:, -1] & spare):
            raise ValueError("padding bits are not zero")
    bits = np.unpackbits(arr, axis=1, count=per_row, bitorder="big")
    return torch.from_numpy(bits).reshape(tuple(shape)).float().mul_(2.0).sub_(1.0)


# ---------------------------------------------------------------- write


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
    if isinstance(o, Path):
        return str(o)
    return str(o)


def _stored(t: torch.Tensor, half: bool) -> torch.Tensor:
    t = t.detach().cpu()
    if half and t.is_floating_point():
        t = t.half()
    return t.contiguous().clone()


def _layer_entry(name: str, layer: ReCUConv2d) -> dict[str, Any]:
    shape = list(layer.weight.shape)
    per_row = math.prod(shape[1:])
    return {
        "name": name,
        "shape": shape,
        "stride": list(layer.stride),
        "padding": list(layer.padding),
        "dilation": list(layer.dilation),
        "groups": int(layer.groups),
        "bias": layer.bias is not None,
        "bits_per_row": per_row,
        "bytes_per_row": (per_row + 7) // 8,
        "tau": float(layer.tau),
        "alpha_mode": layer.alpha_mode,
    }


def _common_tau(layers: list[tuple[str, ReCUConv2d]]) -> float | None:
    taus = {float(m.tau) for _, m in layers}
    return taus.pop() if len(taus) == 1 else None


def save(
    path: str | Path,
    model: nn.Module,
    spec: ModelSpec,
    config: ConvertConfig,
    *,
    half: bool = False,
    keep_latent: bool = False,
    training: dict | None = None,
    history: list[dict] | None = None,
) -> dict[str, Any]:
    """Write `model` (training form, with ReCUConv2d layers) as a packed file, atomically.

    Returns a summary: bytes on disk, binary weights, full-precision values and more.
    """
    from recu_cli.stats import model_stats

    path = Path(path)
    layers = binary_layers(model)
    owners = {n for n, _ in layers}
    tensors: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, layer in layers:
            tensors[name + BITS_SUFFIX] = pack_signs(layer.binary_weight())
            tensors[f"{name}.alpha"] = _stored(layer.effective_alpha(), half)
            if layer.bias is not None:
                tensors[f"{name}.bias"] = _stored(layer.bias, half)
            if layer.act_threshold is not None:  # fp32 always: it decides signs exactly
                tensors[f"{name}.act_threshold"] = _stored(layer.act_threshold, False)
            if keep_latent:
                weight = layer.weight.detach().float().cpu()
                tensors[name + LATENT_SUFFIX] = weight.contiguous().clone()
        for key, value in model.state_dict().items():
            if key.rpartition(".")[0] not in owners:
                tensors[key] = _stored(value, half)
        stats = model_stats(model)
    first_float = next((t.dtype for t in tensors.values() if t.is_floating_point()), None)
    float_dtype = "F16" if half else _dtype_name(first_float or torch.float32)
    metadata = {
        "format": MAGIC,
        "format_version": str(FORMAT_VERSION),
        "recu_version": __version__,
        "model": _json(spec.to_dict()),
        "recipe": _json(config.to_dict()),
        "encoding": _json(ENCODING),
        "layers": _json([_layer_entry(n, m) for n, m in layers]),
        "tau": _json(_common_tau(layers)),
        "storage": _json({"float_dtype": float_dtype, "latent": bool(keep_latent)}),
        "stats": _json(stats),
        "training": _json(training),
        "history": _json(history),
    }
    _write_atomic(path, tensors, metadata)
    binary = sum(math.prod(m.weight.shape) for _, m in layers)
    bits_bytes = sum(t.numel() for k, t in tensors.items() if k.endswith(BITS_SUFFIX))
    latent = sum(tensors[n + LATENT_SUFFIX].numel() for n in owners) if keep_latent else 0
    fp = [t for k, t in tensors.items() if t.is_floating_point()]
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


# ---------------------------------------------------------------- read


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as the header describes it; offsets are relative to the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class PackedFile:
    """A validated packed file, without its tensor data (read lazily by name)."""

    path: Path
    file_bytes: int
    header_bytes: int  # 8-byte length prefix + JSON header
    tensors: dict[str, TensorInfo]
    format_version: int
    recu_version: str
    spec: ModelSpec
    recipe: ConvertConfig
    encoding: dict[str, Any]
    layers: list[dict[str, Any]]
    tau: float | None
    storage: dict[str, Any]
    stats: list[dict[str, Any]]
    training: dict[str, Any] | None
    history: list[dict[str, Any]] | None
    checksum: str | None = None

    @property
    def has_latent(self) -> bool:
        return bool(self.storage.get("latent"))

    def metadata(self) -> dict[str, Any]:
        """Everything recorded besides the tensors, JSON-ready."""
        return {
            "format": MAGIC,
            "format_version": self.format_version,
            "recu_version": self.recu_version,
            "model": self.spec.to_dict(),
            "recipe": self.recipe.to_dict(),
            "encoding": self.encoding,
            "layers": self.layers,
            "tau": self.tau,
            "storage": self.storage,
            "stats": self.stats,
            "training": self.training,
            "history": self.history,
            "checksum": self.checksum,
        }


def _damaged(path: Path, what: str) -> RecuError:
    return RecuError(
        f"{path} is damaged ({what}); write it again with `recu convert` or "
        "`recu binarize`, or copy it again if it was transferred"
    )


def _read_header(path: Path) -> tuple[dict[str, Any], int, int]:
    """Parse and check the safetensors framing; returns (header JSON, header bytes, size)."""
    if not path.exists():
        raise RecuError(f"file not found: {path}; check the path")
    if not path.is_file():
        raise RecuError(f"{path} is not a file; give the path of a packed .safetensors file")
    size = path.stat().st_size
    if size == 0:
        raise RecuError(
            f"{path} is empty (0 bytes); it was not written completely, "
            "write it again with `recu convert` or `recu binarize`"
        )
    try:
        with open(path, "rb") as f:
            prefix = f.read(8)
            n = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            if not 2 <= n <= MAX_HEADER_BYTES:
                raise RecuError(
                    f"{path} is not a safetensors file (its first 8 bytes are no "
                    "valid header length); give a packed checkpoint from recu"
                )
            raw = f.read(n)
    except OSError as e:
        raise RecuError(f"cannot read {path} ({e.strerror or e}); check permissions") from e
    if len(raw) < n:
        if raw[:1] == b"{":
            raise _damaged(path, f"truncated: header needs {n} bytes, only {len(raw)} present")
        raise RecuError(
            f"{path} is not a safetensors file (bad header); give a packed checkpoint from recu"
        )
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise RecuError(
            f"{path} is not a safetensors file (its header is not JSON); give a "
            "packed checkpoint from recu"
        ) from None
    if not isinstance(header, dict):
        raise RecuError(f"{path} is not a safetensors file (header is not a JSON object)")
    return header, 8 + n, size


def _tensor_table(path: Path, header: dict[str, Any], data_bytes: int) -> dict[str, TensorInfo]:
    out: dict[str, TensorInfo] = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        ok = (
            isinstance(e, dict)
            and e.get("dtype") in DTYPE_BYTES
            and isinstance(e.get("shape"), list)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in e["shape"])
            and isinstance(e.get("data_offsets"), list)
            and len(e["data_offsets"]) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in e["data_offsets"])
        )
        if not ok:
            raise _damaged(path, f"bad header entry for tensor '{name[:80]}'")
        b, end = e["data_offsets"]
        info = TensorInfo(name, e["dtype"], tuple(e["shape"]), b, end)
        if not 0 <= b <= end or info.numel * DTYPE_BYTES[info.dtype] != end - b:
            raise _damaged(path, f"tensor '{name[:80]}' offsets do not match its shape")
        out[name] = info
    pos = 0
    for info in sorted(out.values(), key=lambda i: (i.begin, i.end)):
        if info.begin != pos:
            raise _damaged(path, "tensor data overlaps or leaves gaps")
        pos = info.end
    if pos > data_bytes:
        raise _damaged(
            path, f"truncated: tensors need {pos:,} bytes of data, the file has {data_bytes:,}"
        )
    if pos < data_bytes:
        raise _damaged(path, f"{data_bytes - pos:,} unexpected bytes after the last tensor")
    return out


def _check_magic(path: Path, meta: dict[str, str]) -> int:
    fmt = meta.get("format")
    if fmt != MAGIC:
        if fmt is None or fmt in PLAIN_FORMATS:
            what = "is a plain safetensors checkpoint" + (f" (format '{fmt}')" if fmt else "")
        else:
            what = f"has format '{str(fmt)[:40]}', not '{MAGIC}'"
        raise RecuError(
            f"not a recu packed file: {path} {what}; use "
            f"`recu convert MODEL --weights {path} -o packed.safetensors` to make one"
        )
    version = meta.get("format_version", "")
    if not (isinstance(version, str) and version.isdigit() and len(version) < 6):
        raise RecuError(
            f"{path} has no valid format_version ({str(version)[:40]!r}); the "
            "file is damaged, write it again with recu"
        )
    v = int(version)
    if v > FORMAT_VERSION:
        raise RecuError(
            f"{path} uses packed format version {v}, this recu {__version__} reads "
            f"up to {FORMAT_VERSION}; upgrade recu (pip install -U recu)"
        )
    if v < 1:
        raise RecuError(f"{path} has unsupported packed format version {v}; write it again")
    return v


def _field(path: Path, meta: dict[str, str], key: str) -> Any:
    text = meta.get(key)
    if text is None:
        raise _damaged(path, f"metadata '{key}' is missing")
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError, TypeError, ValueError):
        raise _damaged(path, f"metadata '{key}' is not valid JSON") from None


def _is_int(x: Any, lo: int, hi: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and lo <= x <= hi


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _parse_spec(path: Path, d: Any) -> ModelSpec:
    def bad(what: str) -> RecuError:
        return _damaged(path, f"metadata 'model': {what}")

    if not isinstance(d, dict):
        raise bad("not a JSON object")
    need = (
        "name",
        "source",
        "num_classes",
        "input_size",
        "mean",
        "std",
        "interpolation",
        "crop_pct",
    )
    missing = [k for k in need if k not in d]
    if missing:
        raise bad(f"missing {', '.join(missing)}")
    if not isinstance(d["name"], str) or not 0 < len(d["name"]) <= 200:
        raise bad("name is not a short string")
    if d["source"] not in ("timm", "torchvision"):
        raise bad("source must be 'timm' or 'torchvision'")
    if not _is_int(d["num_classes"], 1, 10_000_000):
        raise bad("num_classes is not a positive integer")
    size = d["input_size"]
    if not (isinstance(size, list) and len(size) == 3 and all(_is_int(s, 1, 16384) for s in size)):
        raise bad("input_size is not [channels, height, width]")
    for key in ("mean", "std"):
        v = d[key]
        if not (isinstance(v, list) and len(v) == 3 and all(_is_num(x) for x in v)):
            raise bad(f"{key} is not three numbers")
    if not all(x > 0 for x in d["std"]):
        raise bad("std must be positive")
    if not isinstance(d["interpolation"], str) or not _is_num(d["crop_pct"]) or d["crop_pct"] <= 0:
        raise bad("interpolation/crop_pct have the wrong type")
    spec = ModelSpec.from_dict(d)
    if not is_known(spec.full_name):
        raise RecuError(
            f"{path} was made from model '{spec.full_name[:80]}', which is not registered in "
            "this installation (timm/torchvision/recu); install the library version that has "
            "it, or check that the file is not damaged"
        )
    return spec


_RECIPE_TYPES: dict[str, tuple[type, ...]] = {
    "activation": (str,),
    "alpha_init": (str,),
    "alpha_mode": (str,),
    "b_star": (int, float),
    "tau": (int, float),
    "standardize": (bool,),
    "clamp": (bool,),
    "rescale_activations": (bool,),
    "bireal": (bool,),
    "act_threshold": (str,),
}


def _parse_recipe(path: Path, d: Any) -> ConvertConfig:
    def bad(what: str) -> RecuError:
        return _damaged(path, f"metadata 'recipe': {what}")

    if not isinstance(d, dict):
        raise bad("not a JSON object")
    known = set(_RECIPE_TYPES) | {"keep"}
    unknown = sorted(str(k)[:40] for k in d if k not in known)
    if unknown:
        raise RecuError(
            f"{path} uses conversion option(s) {unknown} that this recu does not know; upgrade recu"
        )
    for key, types in _RECIPE_TYPES.items():
        if key in d:
            v = d[key]
            if not isinstance(v, types) or (bool not in types and isinstance(v, bool)):
                raise bad(f"'{key}' has the wrong type")
            if isinstance(v, float) and not math.isfinite(v):
                raise bad(f"'{key}' is not finite")
    keep = d.get("keep", [])
    if not (isinstance(keep, list) and all(isinstance(p, str) for p in keep)):
        raise bad("'keep' is not a list of patterns")
    try:
        return ConvertConfig.from_dict(d)
    except RecuError as e:
        raise bad(str(e)) from None
    except (TypeError, ValueError) as e:
        raise bad(str(e)[:120]) from None


def _parse_layers(path: Path, d: Any, tensors: dict[str, TensorInfo]) -> list[dict[str, Any]]:
    if not isinstance(d, list):
        raise _damaged(path, "metadata 'layers' is not a list")
    seen: set[str] = set()
    for e in d:
        if not (isinstance(e, dict) and isinstance(e.get("name"), str)):
            raise _damaged(path, "metadata 'layers' has an entry without a name")
        name = e["name"]
        shape = e.get("shape")
        if not (
            isinstance(shape, list)
            and len(shape) == 4
            and all(_is_int(s, 1, 1 << 24) for s in shape)
        ):
            raise _damaged(path, f"layer '{name[:80]}' has no valid [O, I, kh, kw] shape")
        if name in seen:
            raise _damaged(path, f"layer '{name[:80]}' is listed twice")
        seen.add(name)
        if not (_is_num(e.get("tau")) and 0.0 <= e["tau"] <= 1.0):
            raise _damaged(path, f"layer '{name[:80]}' has no valid tau")
        per_row = math.prod(shape[1:])
        bits = tensors.get(name + BITS_SUFFIX)
        want = (shape[0], (per_row + 7) // 8)
        if bits is None:
            raise _damaged(path, f"tensor '{name[:80]}{BITS_SUFFIX}' is missing")
        if bits.dtype != "U8" or bits.shape != want:
            raise RecuError(
                f"{path}: packed weights of '{name[:80]}' are {bits.dtype} {list(bits.shape)} "
                f"but the metadata shape {shape} needs U8 {list(want)}; the file was edited "
                "or damaged, write it again"
            )
    return d


def _parse_list_of_dicts(path: Path, d: Any, key: str, nullable: bool) -> list | None:
    if d is None and nullable:
        return None
    if not (isinstance(d, list) and all(isinstance(x, dict) for x in d)):
        raise _damaged(path, f"metadata '{key}' is not a list of objects")
    return d


_STAT_NUMBERS = (
    "weights",
    "tau",
    "b_hat",
    "q",
    "dead_share",
    "dead_count",
    "plus_share",
    "entropy_bits",
    "entropy_ch_min_bits",
    "entropy_ch_mean_bits",
    "qe",
    "qe_over_b2",
    "qe_closed",
    "qe_closed_paper",
    "laplace_entropy_bits",
    "alpha_mean",
    "act_threshold_abs_mean",
    "act_threshold_abs_max",
)


def _parse_stats(path: Path, d: Any, layers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    stats = _parse_list_of_dicts(path, d, "stats", nullable=False) or []
    names = [e["name"] for e in layers]
    if [s.get("name") for s in stats] != names:
        raise _damaged(path, "metadata 'stats' does not list the binary layers")
    for s in stats:
        for k in _STAT_NUMBERS:
            if k in s and s[k] is not None and not _is_num(s[k]):
                raise _damaged(path, f"statistic '{k}' of '{s['name'][:80]}' is not a number")
        h = s.get("hist")
        if h is not None:
            ok = (
                isinstance(h, dict)
                and _is_num(h.get("range"))
                and h["range"] > 0
                and isinstance(h.get("counts"), list)
                and 0 < len(h["counts"]) <= 10_000
                and all(_is_int(c, 0, 1 << 62) for c in h["counts"])
                and all(_is_int(h.get(k, 0), 0, 1 << 62) for k in ("below", "above"))
            )
            if not ok:
                raise _damaged(path, f"histogram of '{s['name'][:80]}' is malformed")
    return stats


def read(path: str | Path, *, verify: bool = True, checksum: bool = True) -> PackedFile:
    """Header, metadata, statistics and history of a packed file; builds no real model.

    verify=True also rebuilds the module tree on the meta device (no memory, no weights)
    and checks every tensor's name and shape against the recipe. checksum=True reads the
    whole file once to check its checksum (last, so damage gets its specific message).
    """
    path = Path(path)
    header, header_bytes, size = _read_header(path)
    meta = header.get("__metadata__")
    if meta is None:
        meta = {}
    if not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise RecuError(f"{path} is not a safetensors file (metadata is not string->string)")
    version = _check_magic(path, meta)
    tensors = _tensor_table(path, header, size - header_bytes)
    spec = _parse_spec(path, _field(path, meta, "model"))
    recipe = _parse_recipe(path, _field(path, meta, "recipe"))
    layers = _parse_layers(path, _field(path, meta, "layers"), tensors)
    encoding = _field(path, meta, "encoding")
    if not isinstance(encoding, dict) or any(
        encoding.get(k) != v for k, v in ENCODING.items() if k != "values"
    ):
        raise RecuError(f"{path} uses a bit encoding this recu does not read; upgrade recu")
    storage = _field(path, meta, "storage")
    if not isinstance(storage, dict) or not isinstance(storage.get("latent"), bool):
        raise _damaged(path, "metadata 'storage' is malformed")
    tau = _field(path, meta, "tau")
    if tau is not None and not _is_num(tau):
        raise _damaged(path, "metadata 'tau' is not a number")
    training = _field(path, meta, "training")
    if training is not None and not isinstance(training, dict):
        raise _damaged(path, "metadata 'training' is not an object")
    packed = PackedFile(
        path=path,
        file_bytes=size,
        header_bytes=header_bytes,
        tensors=tensors,
        format_version=version,
        recu_version=str(meta.get("recu_version", "?"))[:40],
        spec=spec,
        recipe=recipe,
        encoding=encoding,
        layers=layers,
        tau=tau,
        storage=storage,
        stats=_parse_stats(path, _field(path, meta, "stats"), layers),
        training=training,
        history=_parse_list_of_dicts(path, _field(path, meta, "history"), "history", True),
        checksum=meta.get("checksum"),
    )
    if verify:
        check_against_recipe(packed, skeleton(packed))
    if checksum:
        verify_checksum(packed, header)
    return packed


_NOTED: set[str] = set()


def verify_checksum(packed: PackedFile, header: dict[str, Any] | None = None) -> None:
    """Check the file's checksum; a file from before checksums loads with a note."""
    from recu_cli.checksum import KEY, verify

    if header is None:
        header, _, _ = _read_header(packed.path)
    meta = header.get("__metadata__") or {}
    if KEY not in meta:
        if str(packed.path) not in _NOTED:
            _NOTED.add(str(packed.path))
            from recu_cli.app import err_console

            err_console.print(
                f"note: {packed.path} has no checksum (written by recu {packed.recu_version}), "
                "so damage to it cannot be detected; write it again with this recu to add one",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
        return
    verify(packed.path, header, packed.header_bytes, meta[KEY])


def read_spec(path: str | Path) -> ModelSpec:
    """The model spec (name, classes, input size, normalisation) of a packed file."""
    return read(path, verify=False, checksum=False).spec


# ---------------------------------------------------------------- rebuild


def _build(packed: PackedFile, device: torch.device | str) -> nn.Module:
    """create_model (no weights) -> convert_model(recipe): the training-form tree."""
    with torch.random.fork_rng(devices=[]), torch.device(device):
        try:
            model, _ = create_model(packed.spec.full_name, num_classes=packed.spec.num_classes)
            model, _ = convert_model(model, packed.recipe)
        except RecuError as e:
            raise RecuError(f"{packed.path}: cannot rebuild the model from its recipe: {e}") from e
        except Exception as e:  # noqa: BLE001 - a hostile spec can fail anywhere in a builder
            raise RecuError(
                f"{packed.path}: cannot rebuild {packed.spec.full_name} from its recipe "
                f"({type(e).__name__}: {str(e)[:120]}); the file is damaged or from another "
                "library version"
            ) from e
    return model


def skeleton(packed: PackedFile) -> nn.Module:
    """The training-form module tree on the meta device: shapes only, free to build."""
    return _build(packed, "meta")


def expected_tensors(model: nn.Module) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (kind 'bits'|'float'|'int', shape) that a packed file of `model` holds."""
    owners = {n: m for n, m in binary_layers(model)}
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, m in owners.items():
        per_row = math.prod(m.weight.shape[1:])
        out[name + BITS_SUFFIX] = ("bits", (m.weight.shape[0], (per_row + 7) // 8))
        out[f"{name}.alpha"] = ("float", tuple(m.alpha.shape))
        if m.bias is not None:
            out[f"{name}.bias"] = ("float", tuple(m.bias.shape))
        if m.act_threshold is not None:
            out[f"{name}.act_threshold"] = ("float", tuple(m.act_threshold.shape))
    for key, value in model.state_dict().items():
        if key.rpartition(".")[0] not in owners:
            out[key] = ("float" if value.is_floating_point() else "int", tuple(value.shape))
    return out


def check_against_recipe(packed: PackedFile, model: nn.Module) -> None:
    """Every tensor of the file has the name, kind and shape the recipe's model needs."""
    path = packed.path
    layers = binary_layers(model)
    names = [n for n, _ in layers]
    listed = [e["name"] for e in packed.layers]
    if listed != names:
        raise RecuError(
            f"{path}: metadata lists {len(listed)} binary layers but the recipe "
            f"builds {len(names)}; the file was edited or damaged, write it again"
        )
    for entry, (name, m) in zip(packed.layers, layers, strict=True):
        if list(entry["shape"]) != list(m.weight.shape):
            raise RecuError(
                f"{path}: layer '{name}' has shape {entry['shape']} in the metadata but the "
                f"recipe builds {list(m.weight.shape)}; the file was edited or damaged"
            )
    want = expected_tensors(model)
    latent = {n + LATENT_SUFFIX: tuple(m.weight.shape) for n, m in layers}
    have = packed.tensors
    missing = [k for k in want if k not in have]
    extra = [k for k in have if k not in want and not (packed.has_latent and k in latent)]
    if packed.has_latent:
        missing += [k for k in latent if k not in have]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {few(missing)}")
        if extra:
            parts.append(f"unexpected {few(extra)}")
        raise RecuError(
            f"{path} does not fit the model its recipe builds ({'; '.join(parts)}); "
            "the file was edited or damaged, write it again"
        )
    for key, info in have.items():
        kind, shape = want.get(key) or ("float", latent[key])
        ok_dtype = {"bits": {"U8"}, "float": FLOAT_DTYPES, "int": INT_DTYPES | {"BOOL"}}[kind]
        if info.shape != shape or info.dtype not in ok_dtype:
            raise RecuError(
                f"{path}: tensor '{key}' is {info.dtype} {list(info.shape)} but the recipe "
                f"needs {list(shape)} ({kind}); the file was edited or damaged, write it again"
            )


def read_tensors(packed: PackedFile, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Tensors of the file by name (all when names is None), on the CPU."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(packed.path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in (names if names is not None else f.keys())}
    except (SafetensorError, OSError) as e:
        raise _damaged(packed.path, str(e)[:120]) from e


def read_signs(packed: PackedFile) -> dict[str, torch.Tensor]:
    """Unpacked +-1 weights (float32, OIHW) of every binary layer, by layer name."""
    raw = read_tensors(packed, [e["name"] + BITS_SUFFIX for e in packed.layers])
    out = {}
    for e in packed.layers:
        try:
            out[e["name"]] = unpack_signs(raw[e["name"] + BITS_SUFFIX], e["shape"])
        except ValueError as err:
            raise _damaged(packed.path, f"layer '{e['name'][:80]}': {err}") from None
    return out


def latent_layers(packed: PackedFile) -> dict[str, ReCUConv2d]:
    """Stand-alone ReCUConv2d per binary layer with the stored latent weights and tau.

    For deeper analysis (dead masks at save time) and resume; needs keep_latent=True.
    """
    if not packed.has_latent:
        raise RecuError(f"{packed.path} holds no latent weights; write it with --keep-latent")
    raw = read_tensors(packed, [e["name"] + LATENT_SUFFIX for e in packed.layers])
    kw = packed.recipe.layer_kwargs()
    out = {}
    for e in packed.layers:
        o, i, kh, kw_ = e["shape"]
        layer = ReCUConv2d(i, o, (kh, kw_), **{**kw, "tau": float(e["tau"])})
        with torch.no_grad():
            layer.weight.copy_(raw[e["name"] + LATENT_SUFFIX].float())
        out[e["name"]] = layer
    return out


def _deploy_state(packed: PackedFile, model: nn.Module) -> dict[str, torch.Tensor]:
    raw = read_tensors(packed)
    signs = read_signs(packed)
    binary = {n for n, _ in binary_layers(model)}
    state: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        owner = key.rpartition(".")[0]
        if owner in binary and key.endswith(BITS_SUFFIX):
            state[f"{owner}.weight_sign"] = signs[owner]
        elif owner in binary and key == owner + LATENT_SUFFIX:
            continue
        else:
            state[key] = value
    return state


def load(path: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild the deploy model (BinaryConv2d layers) from the file alone, in eval mode."""
    packed = read(path, verify=False, checksum=False)
    model = skeleton(packed)
    check_against_recipe(packed, model)
    verify_checksum(packed)
    state = _deploy_state(packed, model)
    check_finite(packed.path, state)
    with torch.device("meta"):
        model = to_deploy(model, inplace=True)
    if _materializable(model):
        model = model.to_empty(device=device)
    else:
        model = to_deploy(_build(packed, "cpu"), inplace=True).to(device)
    own = model.state_dict()
    with torch.no_grad():
        for key, value in state.items():
            if key not in own:
                raise RecuError(
                    f"{packed.path}: tensor '{key[:80]}' has no place in the model; "
                    "the file was edited or damaged"
                )
            state[key] = value.to(own[key].dtype)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise RecuError(
            f"{packed.path} does not fit the rebuilt model "
            f"({str(e).splitlines()[0][:160]}); write it again"
        ) from e
    return model.eval()


def check_finite(path: Path, state: dict[str, torch.Tensor]) -> None:
    """Values that no trained model holds (NaN/inf scales, negative or NaN BatchNorm
    variance) would give NaN outputs silently: refuse them with one line."""
    for key, value in state.items():
        if not value.is_floating_point():
            continue
        leaf = key.rpartition(".")[2]
        if leaf == "running_var":
            ok = bool(torch.isfinite(value).all()) and bool((value >= 0).all())
            what = "a BatchNorm variance that is negative, NaN or infinite"
        elif leaf in ("alpha", "running_mean", "weight", "bias", "act_threshold"):
            ok = bool(torch.isfinite(value).all())
            what = "NaN or infinite values"
        else:
            continue
        if not ok:
            raise RecuError(
                f"{path}: tensor '{key[:80]}' holds {what}; the file is damaged or was "
                "saved from a diverged run: write it again from a good run"
            )


def _materializable(model: nn.Module) -> bool:
    """True when every tensor of the meta tree is in its state_dict (so to_empty + load
    restores everything); else rebuild on the CPU (non-persistent buffers, plain attrs)."""
    persistent = set(model.state_dict())
    if any(name not in persistent for name, _ in model.named_buffers()):
        return False
    return not any(isinstance(v, torch.Tensor) for m in model.modules() for v in vars(m).values())
