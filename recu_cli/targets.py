"""A model from what a command is given: a packed file or a model name, decided once.

`recu eval`, `recu bench` and `recu bench --peers` accept either. A packed file gives its
deploy model (`pack.load`, BinaryConv2d layers); a model name gives the full-precision
model (with --weights/--pretrained), converted to ReCU and to the deploy form as asked.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from recu_cli.errors import RecuError

if TYPE_CHECKING:
    from torch import nn

    from recu_cli.pack import PackedFile
    from recu_cli.spec import ModelSpec

Form = Literal["float", "converted", "deploy"]


@dataclass
class Target:
    model: nn.Module  # a packed file's deploy model, or a named model in the form asked
    spec: ModelSpec
    name: str  # what to show: the file's path, or the model's full name
    packed: PackedFile | None = None  # the file's metadata, when the target is a file
    original: nn.Module | None = None  # a named model before conversion (keep_original)


def is_packed_file(target: str) -> bool:
    """Whether a command's target names a packed file (an existing file, or any path
    ending in .safetensors) rather than a model."""
    return Path(target).is_file() or target.endswith(".safetensors")


def load_target(
    target: str,
    form: Form = "deploy",
    *,
    num_classes: int | None = None,
    pretrained: bool = False,
    weights: str | Path | None = None,
    keep_original: bool = False,
) -> Target:
    """The model `target` names: a packed checkpoint (`is_packed_file`) or a model name.

    For a name, `form` says what to make of it: the full-precision model ("float"),
    converted to ReCU ("converted", training form) or its deploy form ("deploy"). A file
    always gives its deploy form, so what only a name takes (weights, pretrained,
    "converted") is refused for it in one line."""
    path = Path(target)
    if is_packed_file(target):
        if weights or pretrained or form == "converted":
            raise RecuError(
                "--weights/--pretrained/--binarize apply to model names, not packed files"
            )
        if not path.is_file():
            raise RecuError(f"{target} does not exist; give a packed checkpoint or a model name")
        from recu_cli.pack import load, read

        packed = read(path, verify=False, checksum=False)
        return Target(load(path), packed.spec, str(path), packed)
    from recu_cli.models.create import create_model

    model, spec = create_model(
        target, num_classes=num_classes, pretrained=pretrained, weights=weights
    )
    original = copy.deepcopy(model).eval() if keep_original else None
    if form != "float":
        from recu_cli.bnn import convert_model, to_deploy

        model, _ = convert_model(model)
        if form == "deploy":
            model = to_deploy(model)
    return Target(model, spec, spec.full_name, original=original)
