"""`PackedFile`: a packed file's header, metadata and statistics, parsed and validated
without its tensor data (`parse`), and the check of its checksum. Importing this module,
`parse(path, known=None)` and `verify_checksum` do not import torch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recu_cli.convert_config import ConvertConfig
from recu_cli.pack import schema as s
from recu_cli.pack import validate as v
from recu_cli.pack.header import (
    METADATA,
    TensorInfo,
    read_header,
    string_metadata,
    tensor_table,
)
from recu_cli.spec import ModelSpec


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
    format_minor: int = 0
    modules: list[dict[str, Any]] | None = None  # since minor 1 (ModuleRecord entries)

    @property
    def has_latent(self) -> bool:
        return bool(self.storage.get("latent"))

    def metadata(self) -> dict[str, Any]:
        """Everything recorded besides the tensors, JSON-ready."""
        return {
            s.FORMAT: s.MAGIC,
            s.VERSION: self.format_version,
            s.MINOR: self.format_minor,
            s.RECU_VERSION: self.recu_version,
            s.MODEL: self.spec.to_dict(),
            s.RECIPE: self.recipe.to_dict(),
            s.ENCODING_KEY: self.encoding,
            s.LAYERS: self.layers,
            s.TAU: self.tau,
            s.STORAGE: self.storage,
            s.STATS: self.stats,
            s.TRAINING: self.training,
            s.HISTORY: self.history,
            s.MODULES: self.modules,
            s.CHECKSUM: self.checksum,
        }


def registered(name: str) -> bool:
    """Whether timm / torchvision / recu's zoo know the model (imports them and torch)."""
    from recu_cli.models.names import is_known

    return is_known(name)


def parse(
    path: Path, known: Callable[[str], bool] | None = registered
) -> tuple[PackedFile, dict[str, Any]]:
    """Framing, metadata and statistics, checked in the order of docs/format.md section 7;
    returns the file and its raw header (for the checksum). `known=None` skips the model
    registry lookup, the one check that needs torch."""
    header, header_bytes, size = read_header(path)
    meta = string_metadata(path, header)
    version = v.check_magic(path, meta)
    minor = v.check_minor(path, meta)
    tensors = tensor_table(path, header, size - header_bytes)
    spec = v.parse_spec(path, v.field(path, meta, s.MODEL), known)
    recipe = v.parse_recipe(path, v.field(path, meta, s.RECIPE))
    layers = v.parse_layers(path, v.field(path, meta, s.LAYERS), tensors)
    encoding = v.check_encoding(path, v.field(path, meta, s.ENCODING_KEY))
    storage = v.check_storage(path, v.field(path, meta, s.STORAGE))
    tau = v.check_tau(path, v.field(path, meta, s.TAU))
    training = v.check_training(path, v.field(path, meta, s.TRAINING))
    modules = None
    if minor >= 1:
        modules = v.parse_modules(path, v.field(path, meta, s.MODULES), layers, tensors)
    packed = PackedFile(
        path=path,
        file_bytes=size,
        header_bytes=header_bytes,
        tensors=tensors,
        format_version=version,
        recu_version=str(meta.get(s.RECU_VERSION, "?"))[:40],
        spec=spec,
        recipe=recipe,
        encoding=encoding,
        layers=layers,
        tau=tau,
        storage=storage,
        stats=v.parse_stats(path, v.field(path, meta, s.STATS), layers),
        training=training,
        history=v.list_of_dicts(path, v.field(path, meta, s.HISTORY), s.HISTORY, True),
        checksum=meta.get(s.CHECKSUM),
        format_minor=minor,
        modules=modules,
    )
    return packed, header


_NOTED: set[str] = set()


def _header(packed: PackedFile, header: dict[str, Any] | None) -> dict[str, Any]:
    if header is None:
        header, _, _ = read_header(packed.path)
    return header


def verify_checksum(packed: PackedFile, header: dict[str, Any] | None = None) -> None:
    """Check the file's checksum; a file from before checksums loads with a note."""
    from recu_cli.checksum import verify

    meta = _header(packed, header).get(METADATA) or {}
    if s.CHECKSUM not in meta:
        if str(packed.path) not in _NOTED:
            _NOTED.add(str(packed.path))
            from recu_cli.console import err_console

            err_console.print(
                f"note: {packed.path} has no checksum (written by recu {packed.recu_version}), "
                "so damage to it cannot be detected; write it again with this recu to add one",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
        return
    verify(packed.path, _header(packed, header), packed.header_bytes, meta[s.CHECKSUM])


def checksum_matches(packed: PackedFile, header: dict[str, Any] | None = None) -> bool:
    """True when the file has a checksum and it matches: the file is byte for byte what a
    writer stored (RECU_SKIP_CHECKSUM does not make this true)."""
    from recu_cli.checksum import matches

    header = _header(packed, header)
    stored = (header.get(METADATA) or {}).get(s.CHECKSUM)
    return matches(packed.path, header, packed.header_bytes, stored)
