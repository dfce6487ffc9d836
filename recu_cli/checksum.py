"""The packed file's checksum: SHA-256 of its header (minus the checksum) and tensor data.

Spec (docs/format.md): take the safetensors header (the JSON object after the 8-byte
length), delete the key "checksum" from its "__metadata__", serialize it canonically
(keys sorted, no spaces, non-ASCII as \\uXXXX: Python's `json.dumps(h, sort_keys=True,
separators=(",", ":"), ensure_ascii=True)`), encode as ASCII, and hash those bytes
followed by every byte after the header (the tensor data, to the end of the file). The
result is stored as metadata "checksum" = "sha256:" + 64 lowercase hex digits.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from recu_cli.errors import RecuError

KEY = "checksum"
PREFIX = "sha256:"
CHUNK = 1 << 20
SKIP_ENV = "RECU_SKIP_CHECKSUM"


def canonical_header(header: dict[str, Any]) -> bytes:
    """The header as hashed: without the checksum, canonical JSON, ASCII."""
    h = dict(header)
    meta = h.get("__metadata__")
    if isinstance(meta, dict):
        h["__metadata__"] = {k: v for k, v in meta.items() if k != KEY}
    text = json.dumps(h, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return text.encode("ascii")


def digest(header: dict[str, Any], data: Iterable[bytes | memoryview]) -> str:
    h = hashlib.sha256(canonical_header(header))
    for chunk in data:
        h.update(chunk)
    return PREFIX + h.hexdigest()


def with_checksum(serialize, tensors: dict, metadata: dict[str, str]) -> bytes:
    """Serialize twice with `serialize(tensors, metadata) -> bytes` (safetensors' own
    writer): once to learn the header and data it writes, once with their checksum."""
    first = serialize(tensors, metadata)
    n = int.from_bytes(first[:8], "little")
    header = json.loads(first[8 : 8 + n])
    value = digest(header, [memoryview(first)[8 + n :]])
    second = serialize(tensors, {**metadata, KEY: value})
    m = int.from_bytes(second[:8], "little")
    if memoryview(second)[8 + m :] != memoryview(first)[8 + n :]:  # never expected
        raise RuntimeError("safetensors wrote different tensor data twice")
    return second


def _well_formed(stored: Any) -> bool:
    return isinstance(stored, str) and stored.startswith(PREFIX) and len(stored) == 71


def _actual(path: Path, header: dict[str, Any], header_bytes: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(header_bytes)
            return digest(header, iter(lambda: f.read(CHUNK), b""))
    except OSError as e:
        raise RecuError(f"cannot read {path} ({e.strerror or e}); check permissions") from e


def matches(path: Path, header: dict[str, Any], header_bytes: int, stored: Any) -> bool:
    """Whether `stored` is a well-formed checksum equal to the file's (no exceptions for a
    mismatch: the caller decides what a file that does not match gets)."""
    return _well_formed(stored) and _actual(path, header, header_bytes) == stored


def verify(path: Path, header: dict[str, Any], header_bytes: int, stored: Any) -> None:
    """Recompute the checksum of `path` and compare; one line naming the file if not."""
    if os.environ.get(SKIP_ENV) == "1":
        return
    if not _well_formed(stored):
        raise RecuError(
            f"{path} is damaged (its checksum entry is malformed); copy it again if it was "
            "transferred, or write it again with `recu convert` or `recu binarize`"
        )
    if _actual(path, header, header_bytes) != stored:
        raise RecuError(
            f"{path} is damaged: its checksum does not match (tensor data or metadata changed "
            "after it was written); copy it again if it was transferred, or write it again "
            f"with `recu convert` or `recu binarize` ({SKIP_ENV}=1 skips this check)"
        )
