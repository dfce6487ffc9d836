"""The two models a peer comparison needs: the float original (for the peers) and the BNN.

Peers run the model a user would deploy instead of recu's BNN: the same architecture at full
precision. From a model name that is the model before conversion. From a packed file it is
rebuilt from the file's model spec, with every full-precision tensor the file holds (stem,
downsample convs, BatchNorms, classifier; the binary layers' latent weights if it kept them);
the rest stays random, which does not change timings.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from recu_cli.errors import RecuError
from recu_cli.spec import ModelSpec


@dataclass
class Models:
    float_model: nn.Module  # full precision, eval mode: what the peers run
    deploy: nn.Module  # the BNN's float deploy form: what recu's engines run
    spec: ModelSpec  # input size (after --img-size) and normalisation, for calibration
    name: str
    weights_note: str  # where the float original's weights come from


def _copy_matching(dst: nn.Module, tensors: dict[str, torch.Tensor]) -> tuple[int, int]:
    """Copy the tensors whose name and shape exist in dst; (copied, dst's total)."""
    own = dst.state_dict()
    hits = {k: v for k, v in tensors.items() if k in own and own[k].shape == v.shape}
    with torch.no_grad():
        for k, v in hits.items():
            own[k].copy_(v.to(own[k].dtype))
    return len(hits), len(own)


def _from_file(path: Path) -> Models:
    from recu_cli.models.create import create_model
    from recu_cli.pack import latent_layers, load, read

    packed = read(path, verify=False)
    deploy = load(path)
    spec = packed.spec
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, _ = create_model(spec.full_name, num_classes=spec.num_classes)
    tensors = dict(deploy.state_dict())
    if packed.has_latent:
        for name, layer in latent_layers(packed).items():
            tensors[f"{name}.weight"] = layer.weight.detach()
    copied, total = _copy_matching(model, tensors)
    note = (
        f"float {spec.full_name} rebuilt from the file's spec: {copied} of {total} tensors from "
        "the file (its full-precision layers"
        + (" and latent weights" if packed.has_latent else "")
        + "), the rest random (timing does not depend on weights)"
    )
    return Models(model.eval(), deploy, spec, str(path), note)


def _from_name(name: str) -> Models:
    from recu_cli.bnn import convert_model, to_deploy
    from recu_cli.models.create import create_model

    model, spec = create_model(name)
    original = copy.deepcopy(model).eval()
    converted, _ = convert_model(model)
    note = "random weights for both the float original and the BNN (timing does not depend on them)"
    return Models(original, to_deploy(converted).eval(), spec, spec.full_name, note)


def load_models(target: str, img_size: int | None = None) -> Models:
    """Float original and BNN deploy form of a packed checkpoint or a model name."""
    path = Path(target)
    if path.is_file() or target.endswith(".safetensors"):
        if not path.is_file():
            raise RecuError(f"{target} does not exist; give a packed checkpoint or a model name")
        models = _from_file(path)
    else:
        models = _from_name(target)
    if img_size is not None:
        c = models.spec.input_size[0]
        models.spec = dataclasses.replace(models.spec, input_size=(c, img_size, img_size))
    return models


def calibration_images(
    data: str | None, spec: ModelSpec, n: int, seed: int = 0
) -> tuple[list[torch.Tensor], str]:
    """n inputs of batch 1 for the int8 peers' calibration, and where they come from.

    With data: real images from its val/ (else train/) ImageFolder through the model's eval
    transforms, spread evenly over the folder (so over its classes). Without: random normal
    inputs, which give poorer int8 ranges but the same speed.
    """
    if data is None:
        gen = torch.Generator().manual_seed(seed + 1)
        xs = [torch.randn(1, *spec.input_size, generator=gen) for _ in range(n)]
        return xs, f"{n} random inputs (no --data given; give --data DIR for real images)"
    from recu_cli.data import _folder, build_transform

    root = Path(data).expanduser()
    split = next((root / s for s in ("val", "validation", "train") if (root / s).is_dir()), None)
    if split is None:
        raise RecuError(
            f"--data {data}: no val/ or train/ folder; give a folder with <split>/<class>/<image>"
        )
    ds = _folder(split, build_transform(spec, train=False))
    if len(ds) == 0:
        raise RecuError(f"--data {data}: {split} holds no images")
    idx = torch.linspace(0, len(ds) - 1, min(n, len(ds))).round().long().unique().tolist()
    xs = [ds[i][0].unsqueeze(0) for i in idx]
    return xs, f"{len(xs)} real images from {split} (eval transforms of the model)"
