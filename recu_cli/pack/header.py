"""The safetensors framing of a packed file, read by hand (docs/format.md section 1).

Why not `safetensors.safe_open` (tried with 0.8.0, framework="numpy"): it reports a
truncated data section and trailing bytes with the same "incomplete metadata, file not
fully covered", a gap or overlap as "invalid shape, data type, or offset for tensor"
without the tensor's name, a half-written header as "invalid header length", all without
byte counts; and it does not expose the header's `data_offsets`, which the checksum
(section 4.1) hashes. So the error lines of section 7 need this reader. It reads only the
header: no torch, no tensor data.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recu_cli.errors import RecuError
from recu_cli.pack.schema import DTYPE_BYTES

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
METADATA = "__metadata__"


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


def damaged(path: Path, what: str) -> RecuError:
    return RecuError(
        f"{path} is damaged ({what}); write it again with `recu convert` or "
        "`recu binarize`, or copy it again if it was transferred"
    )


def read_header(path: Path) -> tuple[dict[str, Any], int, int]:
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
            raise damaged(path, f"truncated: header needs {n} bytes, only {len(raw)} present")
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


def string_metadata(path: Path, header: dict[str, Any]) -> dict[str, str]:
    """The header's `__metadata__` (string -> string; absent = empty)."""
    meta = header.get(METADATA)
    if meta is None:
        meta = {}
    if not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise RecuError(f"{path} is not a safetensors file (metadata is not string->string)")
    return meta


def tensor_table(path: Path, header: dict[str, Any], data_bytes: int) -> dict[str, TensorInfo]:
    """Every tensor entry, checked: known dtype, offsets that fit the shape, and the
    tensors tiling the data section exactly (no gap, overlap, truncation or tail)."""
    out: dict[str, TensorInfo] = {}
    for name, e in header.items():
        if name == METADATA:
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
            raise damaged(path, f"bad header entry for tensor '{name[:80]}'")
        b, end = e["data_offsets"]
        info = TensorInfo(name, e["dtype"], tuple(e["shape"]), b, end)
        if not 0 <= b <= end or info.numel * DTYPE_BYTES[info.dtype] != end - b:
            raise damaged(path, f"tensor '{name[:80]}' offsets do not match its shape")
        out[name] = info
    pos = 0
    for info in sorted(out.values(), key=lambda i: (i.begin, i.end)):
        if info.begin != pos:
            raise damaged(path, "tensor data overlaps or leaves gaps")
        pos = info.end
    if pos > data_bytes:
        raise damaged(
            path, f"truncated: tensors need {pos:,} bytes of data, the file has {data_bytes:,}"
        )
    if pos < data_bytes:
        raise damaged(path, f"{data_bytes - pos:,} unexpected bytes after the last tensor")
    return out
