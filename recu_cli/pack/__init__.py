"""The packed checkpoint: 1 bit per binary weight in a safetensors file (docs/format.md).

Write (`save`), read without building the model (`read`, `read_spec`, `read_signs`),
rebuild the deploy model (`load`). Everything read from a file is validated before use and
every problem becomes one RecuError line; nothing is unpickled, imported or evaluated, and
the model name is only checked against the registries (`recu_cli.models.is_known`).

Modules: `schema` (names and records shared by writer and validator), `bits` (the 1-bit
encoding), `write` (`save`), `header` (safetensors framing), `validate` (metadata checks),
`packed_file` (`PackedFile`, `parse`, the checksum check), `reader` (`read`, `read_spec`),
`rebuild` (the recipe's module tree, tensors, `load`). Importing this package, the schema,
header, validator, packed_file and reader does not import torch; the names that need it
(`save`, `load`, ...) are imported from their module on first use.
"""

from __future__ import annotations

from recu_cli.lazy import lazy_names
from recu_cli.pack.header import MAX_HEADER_BYTES, TensorInfo
from recu_cli.pack.packed_file import PackedFile, checksum_matches, parse, verify_checksum
from recu_cli.pack.reader import read, read_spec
from recu_cli.pack.schema import (
    BITS_SUFFIX,
    DTYPE_BYTES,
    ENCODING,
    FLOAT_DTYPES,
    FORMAT_VERSION,
    INT_DTYPES,
    LATENT_SUFFIX,
    MAGIC,
    PLAIN_FORMATS,
)

_TORCH_NAMES = {
    "pack_signs": "bits",
    "unpack_signs": "bits",
    "save": "write",
    "build_tree": "rebuild",
    "check_against_recipe": "rebuild",
    "check_finite": "rebuild",
    "expected_tensors": "rebuild",
    "latent_layers": "rebuild",
    "load": "rebuild",
    "module_records": "rebuild",
    "read_signs": "rebuild",
    "read_tensors": "rebuild",
    "skeleton": "rebuild",
}
_MODULES = ("bits", "header", "packed_file", "reader", "rebuild", "schema", "validate", "write")

__all__ = [
    "BITS_SUFFIX",
    "DTYPE_BYTES",
    "ENCODING",
    "FLOAT_DTYPES",
    "FORMAT_VERSION",
    "INT_DTYPES",
    "LATENT_SUFFIX",
    "MAGIC",
    "MAX_HEADER_BYTES",
    "PLAIN_FORMATS",
    "PackedFile",
    "TensorInfo",
    "checksum_matches",
    "parse",
    "read",
    "read_spec",
    "verify_checksum",
    *_TORCH_NAMES,
]


__getattr__ = lazy_names(__name__, _TORCH_NAMES, _MODULES)  # torch-using names, submodules


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_TORCH_NAMES) | set(_MODULES))
