"""Checks of a packed file's metadata values, each problem one RecuError line (section 7).

The file is untrusted: every JSON value is checked for type and bounds before use. The
model spec and the recipe check their own fields (`ModelSpec.from_dict`,
`ConvertConfig.from_dict`); this module words their problems with the file's path. No torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import fields
from pathlib import Path
from typing import Any

from recu_cli import __version__
from recu_cli.convert_config import ALPHA_MODES, ConvertConfig
from recu_cli.errors import RecuError
from recu_cli.fields import FieldError, is_int, is_num
from recu_cli.pack import schema as s
from recu_cli.pack.header import TensorInfo, damaged
from recu_cli.spec import ModelSpec


def check_magic(path: Path, meta: dict[str, str]) -> int:
    """The format magic and version; returns the version."""
    fmt = meta.get(s.FORMAT)
    if fmt != s.MAGIC:
        if fmt is None or fmt in s.PLAIN_FORMATS:
            what = "is a plain safetensors checkpoint" + (f" (format '{fmt}')" if fmt else "")
        else:
            what = f"has format {str(fmt)[:40]!r}, not '{s.MAGIC}'"  # repr: one line
        raise RecuError(
            f"not a recu packed file: {path} {what}; use "
            f"`recu convert MODEL --weights {path} -o packed.safetensors` to make one"
        )
    version = meta.get(s.VERSION, "")
    if not (isinstance(version, str) and version.isdigit() and len(version) < 6):
        raise RecuError(
            f"{path} has no valid format_version ({str(version)[:40]!r}); the "
            "file is damaged, write it again with recu"
        )
    v = int(version)
    if v > s.FORMAT_VERSION:
        raise RecuError(
            f"{path} uses packed format version {v}, this recu {__version__} reads "
            f"up to {s.FORMAT_VERSION}; upgrade recu (pip install -U recu)"
        )
    if v < 1:
        raise RecuError(f"{path} has unsupported packed format version {v}; write it again")
    return v


def check_minor(path: Path, meta: dict[str, str]) -> int:
    """The minor version (absent = 0). Minor versions only add metadata, so a larger one
    than this recu knows is read as the largest it knows."""
    minor = meta.get(s.MINOR, "0")
    if not (isinstance(minor, str) and minor.isdigit() and len(minor) < 6):
        raise damaged(path, f"metadata '{s.MINOR}' is not a decimal number below 100000")
    return int(minor)


def field(path: Path, meta: dict[str, str], key: str) -> Any:
    """A JSON-valued metadata entry, parsed."""
    text = meta.get(key)
    if text is None:
        raise damaged(path, f"metadata '{key}' is missing")
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError, TypeError, ValueError):
        raise damaged(path, f"metadata '{key}' is not valid JSON") from None
    if not nested_within(value, MAX_DEPTH):
        raise damaged(path, f"metadata '{key}' is nested deeper than {MAX_DEPTH} levels")
    return value


# recu writes at most 4 levels (training.config.convert.keep); every reader of a value
# (info, analyze --json, the report) may recurse, and Python stops near 1000 levels
MAX_DEPTH = 32


def nested_within(value: Any, limit: int) -> bool:
    """Whether lists and objects nest at most `limit` deep (checked without recursion)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (dict, list)):
            if depth > limit:
                return False
            stack.extend((c, depth + 1) for c in (v.values() if isinstance(v, dict) else v))
    return True


def parse_spec(path: Path, d: Any, known: Callable[[str], bool] | None) -> ModelSpec:
    """The model spec; `known` (a registry lookup) refuses names this install lacks."""
    try:
        spec = ModelSpec.from_dict(d)
    except FieldError as e:
        raise damaged(path, f"metadata '{s.MODEL}': {e.what}") from None
    if known is not None and not known(spec.full_name):
        raise RecuError(
            f"{path} was made from model '{spec.full_name[:80]}', which is not registered in "
            "this installation (timm/torchvision/recu); install the library version that has "
            "it, or check that the file is not damaged"
        )
    return spec


def parse_recipe(path: Path, d: Any) -> ConvertConfig:
    def bad(what: str) -> RecuError:
        return damaged(path, f"metadata '{s.RECIPE}': {what}")

    try:
        return ConvertConfig.from_dict(d)
    except FieldError as e:
        if e.unknown:
            raise RecuError(
                f"{path} uses conversion option(s) {e.unknown} that this recu does not know; "
                "upgrade recu"
            ) from None
        raise bad(e.what) from None
    except RecuError as e:  # a value out of range (ConvertConfig.__post_init__)
        raise bad(str(e)) from None
    except (TypeError, ValueError) as e:
        raise bad(str(e)[:120]) from None


def parse_layers(path: Path, d: Any, tensors: dict[str, TensorInfo]) -> list[dict[str, Any]]:
    """Metadata 'layers': unique names, valid shapes and tau, and a U8 bits tensor each of
    the shape the layer needs."""
    if not isinstance(d, list):
        raise damaged(path, f"metadata '{s.LAYERS}' is not a list")
    seen: set[str] = set()
    for e in d:
        if not (isinstance(e, dict) and isinstance(e.get("name"), str)):
            raise damaged(path, f"metadata '{s.LAYERS}' has an entry without a name")
        name = e["name"]
        shape = e.get("shape")
        if not (
            isinstance(shape, list)
            and len(shape) == 4
            and all(is_int(x, 1, 1 << 24) for x in shape)
        ):
            raise damaged(path, f"layer '{name[:80]}' has no valid [O, I, kh, kw] shape")
        if name in seen:
            raise damaged(path, f"layer '{name[:80]}' is listed twice")
        seen.add(name)
        if not (is_num(e.get("tau")) and 0.0 <= e["tau"] <= 1.0):
            raise damaged(path, f"layer '{name[:80]}' has no valid tau")
        _check_geometry(path, e, shape)
        bits = tensors.get(s.tensor_name(name, s.BITS))
        want = (shape[0], s.bytes_per_row(math.prod(shape[1:])))
        if bits is None:
            raise damaged(path, f"tensor '{name[:80]}{s.BITS_SUFFIX}' is missing")
        if bits.dtype != "U8" or bits.shape != want:
            raise RecuError(
                f"{path}: packed weights of '{name[:80]}' are {bits.dtype} {list(bits.shape)} "
                f"but the metadata shape {shape} needs U8 {list(want)}; the file was edited "
                "or damaged, write it again"
            )
    return d


# bounds of a binary conv's geometry (real ones: stride 1-2, dilation 1-4, padding <= 3)
MAX_STRIDE = MAX_DILATION = 64
MAX_PADDING = 1024


def _check_geometry(path: Path, e: dict[str, Any], shape: list[int]) -> None:
    """stride, padding, dilation, groups, bias, row sizes and alpha mode of one layer."""
    per_row = math.prod(shape[1:])
    groups = e.get("groups")
    checks = (
        ("stride", _pair(e.get("stride"), 1, MAX_STRIDE)),
        ("padding", _pair(e.get("padding"), 0, MAX_PADDING)),
        ("dilation", _pair(e.get("dilation"), 1, MAX_DILATION)),
        ("groups", is_int(groups, 1, shape[0]) and shape[0] % groups == 0),
        ("bias", isinstance(e.get("bias"), bool)),
        ("bits_per_row", e.get("bits_per_row") == per_row and is_int(per_row, 1, 1 << 40)),
        ("bytes_per_row", is_int(e.get("bytes_per_row"), 1, 1 << 40)
         and e["bytes_per_row"] == s.bytes_per_row(per_row)),
        ("alpha_mode", e.get("alpha_mode") in ALPHA_MODES),
    )  # fmt: skip
    for key, ok in checks:
        if not ok:
            value = json.dumps(e.get(key))[:40]
            raise damaged(path, f"layer '{e['name'][:80]}' has an invalid {key} ({value})")


def _pair(v: Any, lo: int, hi: int) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(is_int(x, lo, hi) for x in v)


def list_of_dicts(path: Path, d: Any, key: str, nullable: bool) -> list | None:
    if d is None and nullable:
        return None
    if not (isinstance(d, list) and all(isinstance(x, dict) for x in d)):
        raise damaged(path, f"metadata '{key}' is not a list of objects")
    return d


def parse_stats(path: Path, d: Any, layers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Metadata 'stats': one entry per layer, in order, numbers where `LayerStats` says."""
    stats = list_of_dicts(path, d, s.STATS, nullable=False) or []
    names = [e["name"] for e in layers]
    if [x.get("name") for x in stats] != names:
        raise damaged(path, f"metadata '{s.STATS}' does not list the binary layers")
    for x in stats:
        for k in s.STAT_NUMBERS:
            v = x.get(k)
            if v is not None and not (is_num(v) and abs(v) <= STAT_ABS_MAX):
                raise damaged(path, f"statistic '{k}' of '{x['name'][:80]}' is not a number")
        shape = x.get("shape")
        if shape is not None and not _dims_ok(shape):
            raise damaged(path, f"statistic 'shape' of '{x['name'][:80]}' is malformed")
        h = x.get("hist")
        if h is not None and not _histogram_ok(h):
            raise damaged(path, f"histogram of '{x['name'][:80]}' is malformed")
    return stats


STAT_ABS_MAX = 1e30  # every statistic; sums and ratios of them stay finite
HIST_RANGE = (1e-30, 1e30)  # R of a histogram: |W1| of standardized weights is ~1-10


def _histogram_ok(h: Any) -> bool:
    return (
        isinstance(h, dict)
        and is_num(h.get("range"))
        and HIST_RANGE[0] <= h["range"] <= HIST_RANGE[1]  # 2 R / bins stays a normal float
        and isinstance(h.get("counts"), list)
        and 0 < len(h["counts"]) <= 10_000
        and all(is_int(c, 0, 1 << 62) for c in h["counts"])
        and all(is_int(h.get(k, 0), 0, 1 << 62) for k in ("below", "above"))
    )


def check_encoding(path: Path, encoding: Any) -> dict[str, Any]:
    """The bit encoding must be exactly the one this recu writes (prose entries aside)."""
    if not isinstance(encoding, dict) or any(
        encoding.get(k) != v for k, v in s.ENCODING.items() if k not in s.ENCODING_FREE
    ):
        raise RecuError(f"{path} uses a bit encoding this recu does not read; upgrade recu")
    return encoding


def check_storage(path: Path, storage: Any) -> dict[str, Any]:
    """Only the two entries a writer puts there, each of its type: what `recu info --json`
    passes on stays plain JSON (a number such as Infinity in float_dtype once leaked)."""
    if (
        not isinstance(storage, dict)
        or not isinstance(storage.get("latent"), bool)
        or not isinstance(storage.get("float_dtype", ""), str)
        or len(storage.get("float_dtype", "")) > 16
    ):
        raise damaged(path, f"metadata '{s.STORAGE}' is malformed")
    return {k: storage[k] for k in ("float_dtype", "latent") if k in storage}


def check_tau(path: Path, tau: Any) -> float | None:
    if tau is not None and not is_num(tau):
        raise damaged(path, f"metadata '{s.TAU}' is not a number")
    return tau


def check_training(path: Path, training: Any) -> dict[str, Any] | None:
    if training is not None and not isinstance(training, dict):
        raise damaged(path, f"metadata '{s.TRAINING}' is not an object")
    return training


def parse_modules(
    path: Path, d: Any, layers: list[dict[str, Any]], tensors: Iterable[str]
) -> list[dict[str, Any]]:
    """Metadata 'modules' (minor 1): a record per module that owns tensors, each well typed
    and bounded, exactly the owners of the file's tensors, and for a binary layer a
    `BinaryConv2d` whose output channels and MACs follow from its recorded shape.
    `tensors`: the file's tensor names."""
    if not (isinstance(d, list) and len(d) <= s.MAX_MODULES):
        raise damaged(path, f"metadata '{s.MODULES}' is not a list of module records")
    keys = [f.name for f in fields(s.ModuleRecord)]
    seen: set[str] = set()
    for e in d:
        if not (isinstance(e, dict) and sorted(e) == sorted(keys) and _module_ok(e)):
            raise damaged(path, f"metadata '{s.MODULES}' has a malformed record")
        if e["name"] in seen:
            raise damaged(path, f"module '{e['name'][:80]}' is listed twice in '{s.MODULES}'")
        seen.add(e["name"])
    owners = {s.owner(name) for name in tensors}
    if seen != owners:
        odd = sorted(seen ^ owners)[0]
        raise damaged(path, f"'{s.MODULES}' and the tensors disagree about module '{odd[:80]}'")
    by_name = {e["name"]: e for e in d}
    for layer in layers:
        e = by_name[layer["name"]]  # every binary layer owns its bits tensor
        shape, out = layer["shape"], e["output"]
        fits = out is None or (out[0] == shape[0] and e["macs"] == math.prod(out + shape[1:]))
        if e["type"] != s.BINARY_TYPE or not fits:
            raise damaged(path, f"module record of '{layer['name'][:80]}' does not fit its layer")
    return d


def _module_ok(e: dict[str, Any]) -> bool:
    name, kind, output, macs = e["name"], e["type"], e["output"], e["macs"]
    return (
        isinstance(name, str)
        and len(name) <= 1000
        and isinstance(kind, str)
        and 0 < len(kind) <= 100
        and kind.isidentifier()
        and (output is None) == (macs is None)
        and (output is None or (_dims_ok(output) and is_int(macs, 0, 1 << 62)))
    )


def _dims_ok(dims: Any) -> bool:
    """A shape: 1 to MAX_OUTPUT_DIMS ints in 1..2^31."""
    return (
        isinstance(dims, list)
        and 0 < len(dims) <= s.MAX_OUTPUT_DIMS
        and all(is_int(d, 1, 1 << 31) for d in dims)
    )
