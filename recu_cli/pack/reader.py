"""`read`: a packed file's header, metadata and statistics, validated, without its tensor
data. Importing this module and `read(path, verify=False, checksum=False, known=None)`
do not import torch (`recu info` and `recu analyze` start fast); `verify=True` rebuilds the
module tree (rebuild.py, imported then)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from recu_cli.pack.packed_file import PackedFile, parse, registered, verify_checksum
from recu_cli.spec import ModelSpec


def read(
    path: str | Path,
    *,
    verify: bool = True,
    checksum: bool = True,
    known: Callable[[str], bool] | None = registered,
) -> PackedFile:
    """Header, metadata, statistics and history of a packed file; builds no real model.

    verify=True also rebuilds the module tree on the meta device (no memory, no weights;
    imports torch) and checks every tensor's name and shape against the recipe.
    checksum=True reads the whole file once to check its checksum (last, so damage gets
    its specific message). known: see `packed_file.parse`.
    """
    packed, header = parse(Path(path), known)
    if verify:
        from recu_cli.pack.rebuild import check_against_recipe, skeleton

        check_against_recipe(packed, skeleton(packed))
    if checksum:
        verify_checksum(packed, header)
    return packed


def read_spec(path: str | Path) -> ModelSpec:
    """The model spec (name, classes, input size, normalisation) of a packed file."""
    return parse(Path(path))[0].spec
