"""The packed format's names, in one place for the writer and the validator (docs/format.md).

Tensor names, metadata keys, the bit encoding, dtypes, and the records stored per binary
layer (`LayerEntry` in metadata 'layers', `LayerStats` in 'stats') and per module
(`ModuleRecord` in 'modules'). No torch: reading a file's header and metadata must not pay
for importing it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from recu_cli import checksum

MAGIC = "recu-packed"
FORMAT_VERSION = 2  # 2: optional <layer>.act_threshold tensors (version 1 files still load)
# metadata "checksum" (checksum.py) is optional within version 2, so older readers still
# read new files; a file without one loads with a note
# minor versions add metadata that readers of the same major version may ignore (section 4)
FORMAT_MINOR = 1  # 1: 'modules' (what `recu info` prints per module, so it needs no torch)
PLAIN_FORMATS = ("pt", "tf", "flax", "np", "mlx", "paddle")  # what other writers put there

# ---------------------------------------------------------------- tensors (section 2)

# a binary layer's roles; every one but BITS is the ReCUConv2d attribute it stores
BITS = "weight_bits"  # U8 [O, ceil(K / 8)]
ALPHA = "alpha"
BIAS = "bias"
THRESHOLD = "act_threshold"  # F32 always: it decides signs exactly
LATENT = "weight"  # latent fp32 weights, only with storage.latent
BITS_SUFFIX = "." + BITS
LATENT_SUFFIX = "." + LATENT


def tensor_name(layer: str, role: str) -> str:
    """The tensor a binary layer stores for `role` (BITS, ALPHA, ...)."""
    return f"{layer}.{role}"


def layer_roles(*, bias: bool, threshold: bool, latent: bool) -> list[str]:
    """The roles one binary layer stores, in file order."""
    return [BITS, ALPHA] + [BIAS] * bias + [THRESHOLD] * threshold + [LATENT] * latent


def owner(key: str) -> str:
    """The module a tensor belongs to: state_dict entries of a binary layer's module are
    replaced by its roles, every other module's are stored under their own names."""
    return key.rpartition(".")[0]


def bytes_per_row(bits_per_row: int) -> int:
    return (bits_per_row + 7) // 8


# ---------------------------------------------------------------- dtypes (section 1)

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
KIND_DTYPES = {"bits": {"U8"}, "float": FLOAT_DTYPES, "int": INT_DTYPES | {"BOOL"}}

# ---------------------------------------------------------------- metadata (section 4)

CHECKSUM = checksum.KEY  # plain string, optional within version 2 (section 4.1)
FORMAT = "format"  # plain string: MAGIC
VERSION = "format_version"  # plain string: decimal
MINOR = "format_minor"  # plain string: decimal; absent = 0
RECU_VERSION = "recu_version"  # plain string
MODEL = "model"
RECIPE = "recipe"
ENCODING_KEY = "encoding"
LAYERS = "layers"
TAU = "tau"
STORAGE = "storage"
STATS = "stats"
TRAINING = "training"
HISTORY = "history"
MODULES = "modules"  # since minor 1

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
ENCODING_FREE = ("values",)  # prose: a reader checks every other entry


@dataclass(frozen=True)
class LayerEntry:
    """One entry of metadata 'layers': a binary conv's geometry (section 4)."""

    name: str
    shape: list[int]  # [O, I, kh, kw]
    stride: list[int]
    padding: list[int]
    dilation: list[int]
    groups: int
    bias: bool
    bits_per_row: int  # K = I * kh * kw
    bytes_per_row: int
    tau: float
    alpha_mode: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LayerStats:
    """One entry of metadata 'stats' besides its leading 'name' (section 6).

    `recu_cli.stats.layer_stats` fills it; the validator checks the fields annotated as
    numbers (null allowed) and the histogram.
    """

    shape: list[int]
    weights: int
    tau: float
    clamp: bool
    b_hat: float
    q: float | None
    dead_share: float
    dead_count: int
    plus_share: float
    entropy_bits: float
    entropy_ch_min_bits: float
    entropy_ch_mean_bits: float
    qe: float
    qe_over_b2: float | None
    qe_closed: float
    qe_closed_paper: float
    laplace_entropy_bits: float | None
    alpha_mean: float
    act_threshold_abs_mean: float | None
    act_threshold_abs_max: float | None
    hist: dict[str, Any]  # range, bins, counts, below, above

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


STAT_NUMBERS = tuple(
    f.name for f in fields(LayerStats) if f.type in ("int", "float", "float | None")
)


# ---------------------------------------------------------------- modules (section 4.2)

BINARY_TYPE = "BinaryConv2d"  # a binary layer's class in the deploy model `load` rebuilds
MAX_MODULES = 100_000  # more records than any CNN has: a bound for untrusted files
MAX_OUTPUT_DIMS = 8


@dataclass(frozen=True)
class ModuleRecord:
    """One entry of metadata 'modules' (minor version 1): a module of the deploy model that
    owns tensors of the file, in module order, with its class name, per-sample output shape
    and MACs at the recorded input size (both null where not a conv/linear layer or where
    the shapes could not be computed). A binary layer's MACs are its BOPs."""

    name: str
    type: str
    output: list[int] | None
    macs: int | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
